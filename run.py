#!/usr/bin/env python3
"""Start quotaserver from a checkout: the same as ``python -m quotaserver`` (see cli.py)."""

import sys

from quotaserver.cli import main

if __name__ == "__main__":
    sys.exit(main())
