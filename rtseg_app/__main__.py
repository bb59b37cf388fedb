"""``python -m rtseg_app``: the ``rtseg`` command line."""

import sys

from rtseg_app.cli import main

sys.exit(main())
