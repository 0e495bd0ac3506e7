"""argparse as every ``hmlstm`` command uses it: defaults in --help, and mistakes in one line."""

from __future__ import annotations

import argparse
import difflib
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where its help already says it or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], "") or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, with "did you mean --steps?" for a misspelt flag of the command given, and its errors in the
    one line every other mistake gets (argparse would print the whole usage first: 20 lines for serve)."""

    commands: dict = {}
    _argv: list[str] = []

    def parse_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)

    def error(self, message):
        hint = f"{self.prog} --help lists the options"
        if message.startswith("unrecognized arguments:"):
            command = next((self.commands[a] for a in self._argv if a in self.commands), None)
            known = [o for a in (command._actions if command else self._actions) for o in a.option_strings]
            hint = f"{command.prog if command else self.prog} --help lists the options"
            for token in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(token.split("=")[0], known, n=1, cutoff=0.6) \
                    if token.startswith("--") else []
                if close:
                    hint = f"did you mean {close[0]}?"
                    break
        self.exit(2, f"hmlstm: error: {message} ({hint})\n")
