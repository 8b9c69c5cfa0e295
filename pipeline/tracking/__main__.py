"""``python -m pipeline.tracking upload SPOOL``: upload runs spooled while the store was down."""

import sys

from pipeline.tracking.tracker import main

sys.exit(main())
