"""Command line: `ldfix dump|fix|check|demo|criu-hook`.  Thin shells over the API.

Library code never exits; this module maps every LdfixError to one line on
stderr (`ldfix: error: ...`) and the exit code its class documents."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from ldfix.errors import ExitCode, LdfixError


def _pid(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a process id: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"not a process id: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldfix", description=(
        "Repair the dynamic loader's stale file ids (dev:ino) in live processes "
        "after a checkpoint/restore."))
    p.add_argument("-v", "--verbose", action="count", default=0, help="log what is read (-vv: more)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("dump", help="list the loaded objects of a process, with stored and current ids")
    d.add_argument("pid", type=_pid)
    d.add_argument("--json", action="store_true", help="one JSON object")

    return p


def _error(msg: str) -> None:
    print(f"ldfix: error: {msg}", file=sys.stderr)


def cmd_dump(args: argparse.Namespace) -> int:
    from ldfix.api import inspect
    from ldfix.report import inspection_json, inspection_table

    ins = inspect(args.pid)
    if args.json:
        print(json.dumps(inspection_json(ins), indent=1))
    else:
        print(inspection_table(ins))
    if ins.loader.layout_source is None:
        _error(f"pid {ins.pid}: ids unknown: {ins.loader.layout_error}")
        return ExitCode.UNVERIFIED
    if ins.partial:
        _error(f"pid {ins.pid}: partial result: {'; '.join(ins.warnings)}")
        return ExitCode.CORRUPT
    return ExitCode.OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if exc.code in (0, None) else ExitCode.USAGE
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="ldfix: %(name)s: %(message)s")
    handler = {"dump": cmd_dump}[args.command]
    try:
        return handler(args)
    except LdfixError as exc:
        _error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except BrokenPipeError:
        return ExitCode.OK
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, no traceback
        _error(f"internal error: {type(exc).__name__}: {exc} (run with -vv and report it)")
        if args.verbose >= 2:
            raise
        return ExitCode.INTERNAL


if __name__ == "__main__":
    sys.exit(main())
