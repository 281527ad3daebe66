"""The `yxanul` command line. Thin: parse arguments, call the library, print tables/JSON.

Every subcommand lives in ``yxanul/commands/<name>.py`` and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (taking the parsed args, returning an exit code or None).
A :class:`YxanulError` anywhere becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import pkgutil
import sys

from . import __version__
from .errors import YxanulError


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option that takes a value, unless its help already names a default.

    An option whose parser default is None (a flag that only overrides a config file) shows the config's
    default, read from the parser's ``config_defaults`` callable when it has one.
    """

    config_defaults: dict = {}

    def _shown_default(self, action):
        if action.nargs == 0 or action.default is argparse.SUPPRESS or "default" in (action.help or "").lower():
            return None
        default = action.default if action.default is not None else self.config_defaults.get(action.dest)
        return None if default is None or default == "" else default

    def _format_action(self, action):
        default = self._shown_default(action)
        if default is not None:
            action = copy.copy(action)
            text = f"(default: {default})".replace("%", "%%")
            action.help = f"{action.help} {text}" if action.help else text
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    config_defaults = None  # a command may set a callable returning {dest: default}, shown by --help

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def _get_formatter(self):
        formatter = super()._get_formatter()
        if self.config_defaults is not None:
            formatter.config_defaults = self.config_defaults()
        return formatter

    def error(self, message):  # argparse's own usage errors also exit 2, with one line of the same form
        command = self.prog.removeprefix("yxanul").strip()
        self.exit(2, f"yxanul: error: {command + ': ' if command else ''}{message}\n")


def build_parser() -> argparse.ArgumentParser:
    from . import commands

    parser = _Parser(prog="yxanul", description="FP8 mixed-precision training for small language models.")
    parser.add_argument("--version", action="version", version=f"yxanul {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{commands.__name__}.{info.name}")
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        argv = ["train"]  # the embedded default: train `tiny` on the bundled text, on CPU
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except YxanulError as e:
        print(f"yxanul: error: {e}", file=sys.stderr)
        rc = 2
    except KeyboardInterrupt:
        print("yxanul: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    if getattr(args, "exit_without_teardown", False):
        # After a distributed run everything is written and the process group is gone, but gloo's background
        # threads can still abort the interpreter's teardown ("terminate called without an active exception"),
        # turning a finished run into a crash: leave directly.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(rc or 0))
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
