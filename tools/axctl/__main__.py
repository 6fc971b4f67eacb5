"""``python -m tools.axctl``: the same as the installed ``axctl`` command."""

import sys

from tools.axctl.cli import main

sys.exit(main())
