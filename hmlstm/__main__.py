"""`python -m hmlstm`: the same as the `hmlstm` command."""

import sys

from hmlstm.cli import main

sys.exit(main())
