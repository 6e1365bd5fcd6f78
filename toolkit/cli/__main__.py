"""``python -m toolkit.cli``: the same entry point as the ``rtdetr-deploy`` console script."""

import sys

from .main import main

sys.exit(main())
