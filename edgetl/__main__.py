"""``python -m edgetl``: the ``edgetl`` command."""

import sys

from edgetl.cli import main

sys.exit(main())
