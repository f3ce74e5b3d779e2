"""``python -m probes``: the ``tunnelwatch`` command."""

import sys

from probes.cli import main

sys.exit(main())
