"""Command line: `ldfix dump|fix|check|demo|criu-hook`.  Thin shells over the API.

Library code never exits; this module maps every LdfixError to one line on
stderr (`ldfix: error: ...`) and the exit code its class documents."""

from __future__ import annotations

import argparse
import os
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

    for name, helptext in (("fix", "rewrite the stale ids of processes"),
                           ("check", "exit 0 when no stale id remains, 8 when some do")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("pids", type=_pid, nargs="+", metavar="PID")
        c.add_argument("--tree", action="store_true", help="also every descendant of each PID")
        c.add_argument("--json", action="store_true", help="one JSON object")
        if name == "fix":
            c.add_argument("--dry-run", action="store_true",
                           help="show what would be written (address, old id, new id, path); write nothing")

    sub.add_parser("demo", help="show the bug and the repair on a real process (simulated restore)")
    a = sub.add_parser("agent-path", help="print the path of the preload agent (LD_PRELOAD=$(ldfix agent-path) prog)")
    a.add_argument("--musl", action="store_true", help="the build for musl programs")
    sub.add_parser("criu-hook", help="CRIU action script (what ldfix-criu-hook runs at the acting stage)")
    return p


def _error(msg: str) -> None:
    print(f"ldfix: error: {msg}", file=sys.stderr)


def cmd_dump(args: argparse.Namespace) -> int:
    import json
    from ldfix.api import inspect
    from ldfix.report import inspection_json, inspection_table

    ins = inspect(args.pid)
    if args.json:
        print(json.dumps(inspection_json(ins)))  # one line: the C encoder (indent= is 10x slower)
    else:
        print(inspection_table(ins))
    if ins.loader.layout_source is None:
        _error(f"pid {ins.pid}: ids unknown: {ins.loader.layout_error}")
        return ExitCode.UNVERIFIED
    if ins.partial:
        _error(f"pid {ins.pid}: partial result: {'; '.join(ins.warnings)}")
        return ExitCode.CORRUPT
    return ExitCode.OK


def _targets(args: argparse.Namespace) -> tuple[list[int], dict[int, int]]:
    from ldfix.tree import address_spaces, descendants

    pids: list[int] = []
    for pid in args.pids:
        pids.extend(descendants(pid) if args.tree else [pid])
    return address_spaces(pids)


def _aggregate(codes: list[int]) -> int:
    failed = [c for c in codes if c != ExitCode.OK]
    if not failed:
        return ExitCode.OK
    if len(failed) < len(codes):
        return ExitCode.PARTIAL
    return failed[0] if len(set(failed)) == 1 else ExitCode.PARTIAL


def cmd_fix(args: argparse.Namespace, check_only: bool = False) -> int:
    from ldfix.repair import FixReport, fix
    from ldfix.report import fix_json, fix_text

    pids, covered = _targets(args)
    reports: list[FixReport] = []
    for pid in pids:
        try:
            rep = fix(pid, dry_run=check_only or args.dry_run)
        except LdfixError as exc:
            rep = FixReport(pid=pid, dry_run=check_only or args.dry_run, error=str(exc),
                            exit_code=exc.exit_code)
        except Exception as exc:  # noqa: BLE001 - one process must not stop the others
            rep = FixReport(pid=pid, dry_run=check_only or args.dry_run,
                            error=f"pid {pid}: internal error: {type(exc).__name__}: {exc}",
                            exit_code=ExitCode.INTERNAL)
        if check_only and rep.error is None and rep.planned:
            rep.exit_code = ExitCode.STALE
        reports.append(rep)
        if not args.json:
            if check_only:
                state = rep.error or (f"{len(rep.planned)} stale id(s)" if rep.planned else "no stale id")
                print(f"pid {rep.pid}: {state}")
            else:
                print(fix_text(rep))
        if rep.error and not args.json:
            _error(rep.error)
    code = _aggregate([r.exit_code for r in reports])
    if args.json:
        import json
        doc = {"processes": [fix_json(r) for r in reports],
               "covered": {str(k): v for k, v in covered.items()}, "exit_code": code}
        print(json.dumps(doc))
    return code


def cmd_demo(args: argparse.Namespace) -> int:
    from ldfix.demo import run_demo

    return run_demo()


def cmd_agent_path(args: argparse.Namespace) -> int:
    from ldfix.agent import agent_path

    print(agent_path("musl" if args.musl else "glibc"))
    return ExitCode.OK


def cmd_criu_hook(args: argparse.Namespace) -> int:
    from ldfix.criu import run_hook

    return run_hook()


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if exc.code in (0, None) else ExitCode.USAGE
    if args.verbose:
        from ldfix.log import enable
        enable(30 - 10 * min(args.verbose, 2))
    handler = {"dump": cmd_dump, "fix": cmd_fix, "check": lambda a: cmd_fix(a, check_only=True),
               "demo": cmd_demo, "criu-hook": cmd_criu_hook,
               "agent-path": cmd_agent_path}[args.command]
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


def run() -> None:
    """The `ldfix` command: main(), then exit at once.  Everything a run holds
    (descriptors, ptrace attachments, stopped threads) is released before
    main() returns; what is skipped is the interpreter's teardown, which
    frees every object one by one (10-30 ms after a run over 1000 libraries,
    BENCHMARKS.md)."""
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass  # `ldfix dump | head`: the reader has what it wanted
    except OSError as exc:
        _error(f"cannot write the output: {exc.strerror}")
        code = code or ExitCode.INTERNAL
    try:
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(code)


if __name__ == "__main__":
    run()
