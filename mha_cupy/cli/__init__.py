"""The mha-cupy command line (also python -m mha_cupy): info, verify, compare, bench.

Every command takes ``--json`` (one JSON object on stdout instead of text) and
prints errors as one line on stderr (and, with ``--json``, as
``{"error": ..., "exit_code": 2}`` on stdout).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

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

def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="mha-cupy", description=__doc__.splitlines()[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mha-cupy {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (_info, _verify, _compare, _bench):
        module.add_parser(sub, [common])
    return parser

def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        report = args.run(args)
    except (CliError, BackendUnavailableError, ValueError, TypeError) as exc:  # bad values reaching the library too
        return _fail(args, str(exc))
    if args.json:
        print(json.dumps({"command": args.command, "exit_code": report.code, **report.data}, default=str))
    else:
        print(report.text)
    return report.code

def _fail(args: argparse.Namespace, message: str) -> int:
    print(f"mha-cupy {args.command}: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({"command": args.command, "exit_code": EXIT_USAGE, "error": message}))
    return EXIT_USAGE
