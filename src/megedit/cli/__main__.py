"""`python -m megedit.cli`, the same as the `megedit` command."""

import sys

from . import main

sys.exit(main())
