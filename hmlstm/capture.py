"""Capture what C libraries print on the process's own file descriptors (ONNX Runtime's provider errors,
gRPC's TLS handshake log lines), so that a command can say it in one line of its own.
No dependencies: `hmlstm health` uses it without importing ONNX Runtime."""

from __future__ import annotations

import os
import sys
import tempfile


def capture_fds(fn, fds=(2,)):
    """Run fn() with the file descriptors ``fds`` sent to one temp file; return (result, captured text)."""
    for stream in (sys.stdout, sys.stderr):  # what Python holds back goes out before, not into the capture
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = [os.dup(fd) for fd in fds]
        for fd in fds:
            os.dup2(tmp.fileno(), fd)
        try:
            result = fn()
        finally:
            for fd, old in zip(fds, saved):
                os.dup2(old, fd)
                os.close(old)
        tmp.seek(0)
        return result, tmp.read().decode("utf-8", "replace")
