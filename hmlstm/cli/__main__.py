"""`python -m hmlstm.cli`: the same as the `hmlstm` command."""

import sys

from hmlstm.cli import main

sys.exit(main())
