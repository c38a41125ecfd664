"""``python -m cellrcnn.serve``: see :func:`cellrcnn.serve.main`."""

import sys

from cellrcnn.serve import main

sys.exit(main())
