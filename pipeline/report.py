"""``python -m pipeline.report``: the sweep report command (code: :mod:`pipeline.viz.report`)."""

import sys

from pipeline.viz.report import main

if __name__ == "__main__":
    sys.exit(main())
