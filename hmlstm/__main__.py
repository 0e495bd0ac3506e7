"""`python -m hmlstm`: the same as the `hmlstm` command."""

import sys

from hmlstm.cli.process import run

sys.exit(run())
