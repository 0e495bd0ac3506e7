"""`python -m hmlstm.cli`: the same as the `hmlstm` command."""

import sys

from hmlstm.cli.process import run

sys.exit(run())
