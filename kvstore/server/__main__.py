"""``python -m kvstore.server``: run a store node (see :mod:`kvstore.server.cli`)."""

import sys

from kvstore.server.cli import main

sys.exit(main())
