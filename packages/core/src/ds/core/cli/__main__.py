"""``python -m ds.core.cli``: the ``ds`` command without the console script."""

import sys

from ds.core.cli import main

sys.exit(main())
