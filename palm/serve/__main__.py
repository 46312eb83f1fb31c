"""`python -m palm.serve ...`: the same as `palm serve ...`."""

import sys

from palm.serve.cli import main

sys.exit(main())
