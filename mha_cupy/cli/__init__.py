"""The mha-cupy command line (also python -m mha_cupy): info, verify, compare, bench.

Every command takes ``--json`` (one JSON object on stdout instead of text) and
prints errors as one line on stderr (and, with ``--json``, as
``{"error": ..., "exit_code": 2}`` on stdout).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Sequence

from .._backends import BackendUnavailableError
from . import _bench, _compare, _info, _verify
from ._report import EXIT_MISMATCH, EXIT_OK, EXIT_USAGE, CliError

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_MISMATCH", "EXIT_USAGE"]

EPILOG = """exit codes:
  0  success
  1  a numerical check failed: a fixture mismatch (verify), a difference beyond
     the tolerance (compare), outputs that differ from torch's (bench)
  2  bad usage or option values, missing files, or a backend that is not usable here

Run `mha-cupy COMMAND --help` for each command's options and defaults."""

class UsageError(Exception):
    """argparse's own complaint (an unknown option, a bad value), as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` instead of printing its usage and exiting, so that usage errors are one
    line on stderr (and a JSON object with ``--json``) like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="mha-cupy", description=__doc__.splitlines()[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mha-cupy {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (_info, _verify, _compare, _bench):
        module.add_parser(sub, [common])
    parser.commands = sub.choices  # type: ignore[attr-defined]  # for the did-you-mean of unknown options
    return parser

def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        command = next((a for a in argv if a in COMMANDS), None)
        message = str(exc) if command is None else str(exc).replace("`mha-cupy --help`", f"`mha-cupy {command} --help`")
        if command is not None:
            message = _did_you_mean(message, parser.commands[command])
        return _fail(argparse.Namespace(command=command, json="--json" in argv), message)
    try:
        report = args.run(args)
    except (CliError, BackendUnavailableError, ValueError, TypeError) as exc:  # bad values reaching the library too
        return _fail(args, _for_the_command_line(str(exc)))
    if args.json:
        print(json.dumps({"command": args.command, "exit_code": report.code, **report.data}, default=str))
    else:
        print(report.text)
    return report.code

#: The commands, for naming the one a usage error belongs to.
COMMANDS = ("info", "verify", "compare", "bench")


def _did_you_mean(message: str, command: argparse.ArgumentParser) -> str:
    """``message`` with the closest option of ``command`` named after each unknown option in it (``difflib``)."""
    if "unrecognized arguments:" not in message:
        return message
    head, sep, tail = message.partition(" (see ")
    known = sorted(set(re.findall(r"--[a-z0-9][a-z0-9-]*", command.format_help())))
    unknown = [w for w in head.split("unrecognized arguments:", 1)[1].split() if w.startswith("--")]
    hints = [f"{close[0]} for {w}" for w in unknown if (close := difflib.get_close_matches(w, known, n=1, cutoff=0.7))]
    return f"{head}; did you mean {', '.join(hints)}?{sep}{tail}" if hints else message


def _for_the_command_line(message: str) -> str:
    """A library message with its keyword spellings turned into the options that set them here."""
    return message.replace("xp='numpy'", "--xp numpy").replace("xp='", "--xp '")


def _fail(args: argparse.Namespace, message: str) -> int:
    where = f"mha-cupy {args.command}" if args.command else "mha-cupy"
    print(f"{where}: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({"command": args.command, "exit_code": EXIT_USAGE, "error": message}))
    return EXIT_USAGE
