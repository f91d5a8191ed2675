"""``python -m xmx.report``: see :mod:`xmx.report`."""

import sys

from xmx.report.cli import main

sys.exit(main())
