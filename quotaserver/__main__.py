"""``python -m quotaserver``: see :mod:`quotaserver.cli`."""

import sys

from .cli import main

sys.exit(main())
