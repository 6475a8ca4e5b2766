#!/usr/bin/env python3
"""Cost of the preload agent's restore check (issue 7), on dlopen() of an
already-loaded library:

    python3 bench/agent_bench.py [--runs 9] [--calls 2000] [--fresh 100] [--rounds 5] [--agent PATH]

csrc/agent_bench.c dlopen()s a library once, then, per round, times:
  same path       CALLS dlopen() of it by the same path (the loader finds the
                  name: the case the goal is about);
  same symlink    CALLS through one symlink (found by id once, then by name:
                  the loader adds the alias to the object's names);
  fresh symlink   FRESH first uses of as many symlinks (each time the loader
                  opens the file and compares ids: the case a restore breaks).
Each run is one process; runs with and without LD_PRELOAD of the agent
alternate.  Every figure is the median over runs of the per-run median over
rounds, in ns per dlopen() call.  Goal: with the agent under 2x the call
without it.

The agent is the installed one (`ldfix agent-path`; its path length matters:
the check is one stat() of it) unless --agent is given; musl rows need
musl-gcc and the installed musl agent."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOAL = 2.0


def build(cc: str, out: Path, fresh: int, rounds: int) -> tuple[Path, Path, Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    bench = out / "agent_bench"
    subprocess.run([cc, "-O2", "-Wall", "-o", str(bench), str(REPO / "csrc" / "agent_bench.c"), "-ldl"],
                   check=True)
    lib = out / "lib" / "libldfix_demo.so"
    lib.parent.mkdir(exist_ok=True)
    subprocess.run([cc, "-O2", "-Wall", "-shared", "-fPIC", "-Wl,--build-id", "-o", str(lib),
                    str(REPO / "csrc" / "fixtures" / "libdemo.c")], check=True)
    alias = out / "alias.so"
    if not alias.exists():
        alias.symlink_to(lib)
    freshdir = out / "fresh"
    freshdir.mkdir(exist_ok=True)
    for r in range(rounds):
        for i in range(fresh):
            link = freshdir / f"{r}_{i}.so"
            if not link.exists():
                link.symlink_to(lib)
    return bench, lib, alias, freshdir


CASES = ("same path", "same symlink", "fresh symlink")


def one_run(bench: Path, lib: Path, alias: Path, freshdir: Path, args: argparse.Namespace,
            agent: str | None, calls: int | None = None, rounds: int | None = None) -> list[float]:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env.pop("LDFIX_AGENT_DEBUG", None)
    if agent:
        env["LD_PRELOAD"] = agent
    argv = [str(bench), str(lib), str(alias), str(freshdir), str(calls or args.calls), str(args.fresh),
            str(rounds or args.rounds)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    rows = [line.split()[1:] for line in out.splitlines() if line.startswith("round ")]
    return [statistics.median(float(r[i]) for r in rows) for i in range(len(CASES))]


def measure(label: str, cc: str, agent: str, work: Path, args: argparse.Namespace) -> list[tuple[str, float, float]]:
    bench, lib, alias, freshdir = build(cc, work / label, args.fresh, args.rounds)
    one_run(bench, lib, alias, freshdir, args, agent, calls=200, rounds=1)  # warm the caches
    without: list[list[float]] = []
    with_agent: list[list[float]] = []
    for _ in range(args.runs):
        without.append(one_run(bench, lib, alias, freshdir, args, None))
        with_agent.append(one_run(bench, lib, alias, freshdir, args, agent))
    rows = []
    for i, how in enumerate(CASES):
        base = statistics.median(r[i] for r in without)
        withv = statistics.median(r[i] for r in with_agent)
        rows.append((f"{label}, {how}", base, withv))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--calls", type=int, default=2000, help="dlopen() calls per round, same path/symlink")
    ap.add_argument("--fresh", type=int, default=100, help="fresh symlinks per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--agent", help="glibc agent to preload (default: the installed one)")
    ap.add_argument("--musl-agent", help="musl agent to preload (default: the installed one)")
    ap.add_argument("--workdir", help="where to build (default: a temporary directory)")
    args = ap.parse_args()

    from ldfix.agent import agent_path
    from ldfix.errors import LdfixError

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ldfix-agent-bench-"))
    glibc_agent = args.agent or agent_path()
    results = [*measure("glibc", os.environ.get("CC", "gcc"), glibc_agent, work, args)]
    notes = []
    musl_cc = shutil.which("musl-gcc")
    try:
        musl_agent = args.musl_agent or agent_path("musl")
    except LdfixError as exc:
        musl_agent = None
        notes.append(f"musl rows skipped: {exc}")
    if musl_cc and musl_agent:
        results += measure("musl", musl_cc, musl_agent, work, args)
    elif not musl_cc:
        notes.append("musl rows skipped: no musl-gcc")

    print(f"# ldfix preload agent: dlopen() of an already-loaded library, ns per call "
          f"(median of {args.runs} runs x median of {args.rounds} rounds x {args.calls} calls, "
          f"{args.fresh} for fresh symlinks)")
    print(f"# {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; glibc agent: {glibc_agent} ({len(glibc_agent)} chars)")
    print(f"{'case':<24} {'without':>10} {'with agent':>11} {'ratio':>7} {'goal':>6}")
    worst = 0.0
    for name, base, withv in results:
        ratio = withv / base
        worst = max(worst, ratio)
        print(f"{name:<24} {base:>10.1f} {withv:>11.1f} {ratio:>6.2f}x {'ok' if ratio < GOAL else 'MISS':>6}")
    for n in notes:
        print(f"# {n}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if worst < GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
