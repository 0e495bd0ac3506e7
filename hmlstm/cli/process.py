"""The process's entry: the `hmlstm` command and `python -m hmlstm` run ``run``, tests call ``main``."""

from __future__ import annotations

import signal
import threading

from hmlstm.cli import main


def run() -> int:
    """``main``, then an exit nothing breaks into. Once the command has finished, or was interrupted and saved
    its work, a further Ctrl-C or SIGTERM would land in the interpreter's teardown, where TensorFlow's objects
    print a traceback from __del__. (Not in ``main``: a test's process keeps its own Ctrl-C.)"""
    status = main()
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
    return status
