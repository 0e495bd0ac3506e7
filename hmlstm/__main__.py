"""`python -m hmlstm`: the same as the `hmlstm` command."""

import sys

from hmlstm.cli import run

sys.exit(run())
