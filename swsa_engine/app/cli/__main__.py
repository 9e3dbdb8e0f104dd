"""``python -m swsa_engine.app.cli``: the ``swsa`` command line."""

import sys

from swsa_engine.app.cli import main

sys.exit(main())
