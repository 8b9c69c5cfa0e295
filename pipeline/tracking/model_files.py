"""Model files: an MLP saved as a plain ``.npz`` archive and loaded without pickle.

Layout of the archive (every member a plain numeric array, so ``allow_pickle`` is never
needed)::

    format.npy   uint8 bytes of b"backprop-pipeline-mlp"   (what the file is)
    version.npy  int64 scalar, FORMAT_VERSION               (how to read it)
    config.npy   uint8 bytes of the UTF-8 JSON of MLP.get_config()
    params.npy   the flat parameter vector (weights then biases), float32 or float64

Loading trusts nothing in the file: every member's header is checked before its data is
read (so a header claiming a huge shape cannot exhaust memory, and an object array, the
only way pickle could enter, is refused), then the architecture is validated and the
parameter count, dtype and finiteness are checked against it. Any problem raises
``ValueError("model file <path> is not a valid backprop-pipeline model: <why>")``.
"""

from __future__ import annotations

import inspect
import io
import json
import math
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from pipeline.engine.mlp import MLP

FORMAT_NAME = b"backprop-pipeline-mlp"
FORMAT_VERSION = 1
_MEMBERS = ("format", "version", "config", "params")
# A member larger than this is refused before it is read (2**30 float64 parameters).
_MAX_MEMBER_BYTES = 8 * 2**30
_MAX_CONFIG_BYTES = 2**20


class _Invalid(Exception):
    """Internal: carries the reason a file was rejected."""


def save_model(model: MLP, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` as an ``.npz`` archive (written atomically).

    Parameters
    ----------
    model : MLP
        The network; its ``get_config()`` and flat ``params`` (shape ``(n_params,)``) are
        stored.
    path : str or path-like
        Destination, used exactly as given (no ``.npz`` is appended).

    Returns
    -------
    Path
        The path written.
    """
    path = Path(path)
    config = json.dumps(model.get_config(), sort_keys=True).encode("utf-8")
    arrays = {
        "format": np.frombuffer(FORMAT_NAME, dtype=np.uint8),
        "version": np.array(FORMAT_VERSION, dtype=np.int64),
        "config": np.frombuffer(config, dtype=np.uint8),
        "params": np.ascontiguousarray(model.params),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target then rename, so a crash never leaves a half-written model.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_model(path: str | os.PathLike) -> MLP:
    """Load a network saved by :func:`save_model`, validating everything in the file.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        ``"model file <path> is not a valid backprop-pipeline model: <why>"`` for a foreign,
        truncated or tampered file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        return _load(path)
    except _Invalid as e:
        raise ValueError(f"model file {path} is not a valid backprop-pipeline model: {e}") from None


def _load(path: Path) -> MLP:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise _Invalid(f"not an .npz (zip) archive ({e})") from None
    with zf:
        names = set(zf.namelist())
        expected = {f"{m}.npy" for m in _MEMBERS}
        if names != expected:
            raise _Invalid(
                f"archive holds {sorted(names)}; expected exactly {sorted(expected)}"
            )
        arrays = {m: _read_member(zf, f"{m}.npy") for m in _MEMBERS}

    fmt = arrays["format"]
    if fmt.dtype != np.uint8 or fmt.ndim != 1 or fmt.tobytes() != FORMAT_NAME:
        raise _Invalid(
            "format marker missing or wrong (not written by "
            "pipeline.tracking.model_files.save_model)"
        )
    version = arrays["version"]
    if version.shape != () or version.dtype.kind not in "iu" or int(version) != FORMAT_VERSION:
        raise _Invalid(
            f"format version {version.tolist()!r} is not supported "
            f"(this code reads version {FORMAT_VERSION})"
        )

    config = _parse_config(arrays["config"])
    params = arrays["params"]
    if params.ndim != 1 or params.dtype.kind != "f":
        raise _Invalid(f"params must be a 1-D float vector; got {params.dtype} {params.shape}")
    if params.dtype.name != config["dtype"]:
        raise _Invalid(f"params have dtype {params.dtype.name} but config says {config['dtype']}")
    n_expected = _n_params(config["sizes"], config.get("bias", True))
    if params.size != n_expected:
        raise _Invalid(
            f"{params.size} parameters stored but sizes {config['sizes']} "
            f"(bias={config.get('bias', True)}) need {n_expected}"
        )
    if not np.all(np.isfinite(params)):
        raise _Invalid(f"{int(np.sum(~np.isfinite(params)))} parameters are NaN or infinite")

    try:
        model = MLP(**config)
        model.set_params(params)
    except Exception as e:  # any rejection by the constructor is a bad file
        raise _Invalid(f"config rejected by MLP: {e}") from None
    return model


def _read_member(zf: zipfile.ZipFile, name: str) -> np.ndarray:
    """Read one ``.npy`` member, checking its header before reading any data."""
    info = zf.getinfo(name)
    if info.file_size > _MAX_MEMBER_BYTES:
        raise _Invalid(f"member {name} claims {info.file_size} bytes, more than allowed")
    try:
        data = zf.read(name)  # verifies the member's CRC-32: catches flipped bytes
    except Exception as e:  # zlib/zipfile/EOF errors on truncated files
        raise _Invalid(f"member {name} cannot be read ({type(e).__name__}: {e})") from None
    buf = io.BytesIO(data)
    try:
        major, _minor = np.lib.format.read_magic(buf)
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        elif major in (2, 3):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        else:
            raise ValueError(f"unknown .npy version {major}")
    except Exception as e:  # any malformed header
        raise _Invalid(f"member {name} has no valid .npy header ({e})") from None
    if dtype.hasobject:
        raise _Invalid(f"member {name} is an object array (pickled data), which is refused")
    n_bytes = math.prod(shape) * dtype.itemsize
    if n_bytes != len(data) - buf.tell():
        raise _Invalid(
            f"member {name}: header says {shape} {dtype} ({n_bytes} bytes) but "
            f"{len(data) - buf.tell()} bytes follow"
        )
    buf.seek(0)
    try:
        return np.lib.format.read_array(buf, allow_pickle=False)
    except Exception as e:
        raise _Invalid(f"member {name} cannot be decoded ({e})") from None


def _parse_config(raw: np.ndarray) -> dict:
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size > _MAX_CONFIG_BYTES:
        raise _Invalid(f"config must be a 1-D uint8 byte array; got {raw.dtype} {raw.shape}")
    try:
        config = json.loads(raw.tobytes().decode("utf-8"))
    except Exception as e:  # UnicodeDecodeError, JSONDecodeError, RecursionError
        raise _Invalid(f"config is not valid UTF-8 JSON ({e})") from None
    if not isinstance(config, dict):
        raise _Invalid(f"config must be a JSON object; got {type(config).__name__}")
    known = set(inspect.signature(MLP.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise _Invalid(f"config has unknown keys {unknown}; known keys are {sorted(known)}")
    for key in ("sizes", "dtype"):
        if key not in config:
            raise _Invalid(f"config lacks the required key {key!r}")
    sizes = config["sizes"]
    if (
        not isinstance(sizes, list)
        or len(sizes) < 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)
    ):
        raise _Invalid(f"config sizes={sizes!r} must be a list of at least 2 integers >= 1")
    if config["dtype"] not in ("float32", "float64"):
        raise _Invalid(f"config dtype={config['dtype']!r} must be 'float32' or 'float64'")
    if not isinstance(config.get("bias", True), bool):
        raise _Invalid(f"config bias={config['bias']!r} must be true or false")
    return config


def _n_params(sizes: list[int], bias: bool) -> int:
    """Parameter count of the architecture, computed before anything is allocated."""
    n = sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=False))
    return n + (sum(sizes[1:]) if bias else 0)
