"""``python -m flaxgpt`` runs the command-line interface."""

import sys

from flaxgpt.cli import main

sys.exit(main())
