"""Helpers shared by the tests that start real servers (mlflow server, models serve)."""

from __future__ import annotations

import subprocess
import time
import urllib.request


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 90,
              interval: float = 0.3) -> None:
    """Wait until ``url`` answers 200, failing early if ``proc`` (the server) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(interval)
    raise TimeoutError(f"{url} did not answer within {timeout} s")
