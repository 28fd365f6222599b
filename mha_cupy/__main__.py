"""``python -m mha_cupy``: the ``mha-cupy`` command line."""

import sys

from .cli import main

sys.exit(main())
