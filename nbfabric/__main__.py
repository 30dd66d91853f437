"""`python -m nbfabric`: the same as the `nbfabric` command."""

import sys

from nbfabric.cli import main

sys.exit(main())
