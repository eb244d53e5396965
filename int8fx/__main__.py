"""``python -m int8fx``: see ``int8fx.cli``."""

import sys

from int8fx.cli import main

sys.exit(main())
