"""The ``hmlstm`` command: parse flags, build a config, call one function (one module per command).

User mistakes (``UserError``) print one line, ``hmlstm: error: ...``, and exit
2 with no traceback. TensorFlow is imported only by the subcommands that need
it, with its start-up chatter silenced.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import hmlstm
from hmlstm.cli.common import _unescape, quiet_tensorflow
from hmlstm.cli.demo import DEMO_TEXT, _add_demo
from hmlstm.cli.evaluate import _add_evaluate
from hmlstm.cli.export import _add_export
from hmlstm.cli.health import _add_health
from hmlstm.cli.info import _add_info
from hmlstm.cli.parsing import HelpFormatter, Parser
from hmlstm.cli.plot import _add_plot
from hmlstm.cli.segment import _add_segment
from hmlstm.cli.serve import _add_serve
from hmlstm.cli.train import PRESETS, _add_train, given_settings, preset_settings
from hmlstm.errors import Terminated, UserError

__all__ = ["main", "parse", "build_parser", "quiet_tensorflow", "DEMO_TEXT", "PRESETS", "UserError", "_unescape"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="hmlstm", description="Streaming sequence segmentation with a Hierarchical Multiscale LSTM.")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices
    parser.add_argument("--version", action="version", version=f"hmlstm {hmlstm.__version__}")
    _add_parser = sub.add_parser

    def add_parser(name, **kw):  # every command's --help shows its defaults
        kw["formatter_class"] = HelpFormatter
        return _add_parser(name, **kw)

    sub.add_parser = add_parser
    _add_train(sub)
    _add_plot(sub)
    _add_evaluate(sub)
    _add_export(sub)
    _add_serve(sub)
    _add_health(sub)
    _add_segment(sub)
    _add_demo(sub)
    _add_info(sub)
    return parser


# Modules of the [train] extra (pyproject.toml): a server-only install lacks them.
TRAIN_EXTRA = ("tensorflow", "tensorboard", "tf2onnx", "onnx", "tqdm", "matplotlib")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's settings, a preset's applied: its settings become the defaults, and a flag given on
    the line replaces the preset's value of that setting and of the settings that depend on it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "preset", None):
        command = parser.commands[args.command]
        given = given_settings(parser, command, argv)
        command.set_defaults(**preset_settings(args.preset, given, args))
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.command in ("segment", "health", "demo"):  # gRPC's C core logs TLS failures itself: each command says
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # the cause in its own one line instead
    # SIGTERM (docker stop, kill) unwinds like Ctrl-C, so that what a command cleans up on the way out (temporary
    # folders, half-written outputs) is cleaned up; train and serve install their own handlers over this one.
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        return args.func(args)
    except UserError as e:
        print(f"hmlstm: error: {e}", file=sys.stderr)
        return e.status
    except Terminated:
        print("hmlstm: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("hmlstm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `hmlstm segment ... | head`: the reader left; no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # as a process killed by SIGPIPE
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in TRAIN_EXTRA:
            raise
        print(f"hmlstm: error: `hmlstm {args.command}` needs {e.name.split('.')[0]}, which the server-only install "
              "leaves out; install training, export and plots with: pip install 'hmlstm[train]'", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame):
    raise Terminated()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
