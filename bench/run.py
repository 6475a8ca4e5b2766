#!/usr/bin/env python3
"""ldfix benchmarks (issue: Performance).  One command prints every goal:

    python3 bench/run.py [--runs 7] [--only G1,G2,...] [--workdir /dev/shm/ldfix-bench]

Workloads (all real processes, built here from csrc/fixtures):
  W1  one glibc process, 1000 dlopen()ed libraries, all stale; also with 16 threads
  W2  the same at 10, 100, 1000, 5000 libraries
  W3  a tree of 100 processes with 50 libraries each
  W4  the CRIU hook: an ignored stage, and the acting stage on W1
A restore is simulated by swapping every library for a byte-identical twin
(two inodes per library, alternated, both kept alive so numbers never recur).
Every figure is a median of --runs runs; every goal is a ratio against a
reference measured in the same run (python -c pass, pldd, /bin/true), run
alternately with what it measures so that both see the same noise."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from helpers import FifoTarget, Target, build_fixtures  # noqa: E402

SCRIPTS = Path(sysconfig.get_path("scripts"))
LDFIX = [str(SCRIPTS / "ldfix")]
HOOK = str(SCRIPTS / "ldfix-criu-hook")
PY = sys.executable


def timed(argv: list[str], env: dict[str, str] | None = None, stdin: int | None = subprocess.DEVNULL) -> tuple[float, str, int]:
    """(seconds, stdout, peak RSS in KiB) of one run."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, stdin=stdin)
    out, _err = p.communicate()
    dt = time.perf_counter() - t0
    # communicate() reaped it; the rusage of children is cumulative, so use wait4 semantics via resource:
    return dt, out.decode(errors="replace"), _last_rss(p.pid)


_RSS: dict[int, int] = {}


def _last_rss(pid: int) -> int:
    return _RSS.get(pid, 0)


# A process's peak RSS survives fork and exec (Linux keeps the high-water
# mark in the signal struct): a child forked from this ~20 MiB interpreter
# would report at least 20 MiB whatever it runs.  So the command is started
# by a small C program, whose own peak is ~1 MiB, and it reports the child's.
RSS_OF = r"""
#include <stdio.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv)
{
    struct rusage ru;
    int status;
    pid_t pid = fork();
    if (pid == 0) {
        freopen("/dev/null", "w", stdout);  /* only the figure goes to our stdout */
        execvp(argv[1], argv + 1);
        _exit(127);
    }
    if (pid < 0 || wait4(pid, &status, 0, &ru) < 0)
        return 1;
    printf("%ld\n", ru.ru_maxrss);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
"""
_RSS_TOOL: list[str] = []


def run_rss(argv: list[str], work: Path) -> int:
    """Peak RSS (KiB) of one run of argv."""
    if not _RSS_TOOL:
        src, exe = work / "rss_of.c", work / "rss_of"
        src.write_text(RSS_OF)
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], check=True)
        _RSS_TOOL.append(str(exe))
    out = subprocess.run([_RSS_TOOL[0], *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{argv} failed ({out.returncode}): {out.stderr.strip()}")
    return int(out.stdout.strip())


def median(xs: list[float]) -> float:
    return statistics.median(xs)


@dataclass
class Libs:
    """n library slots, each with two byte-identical twins to alternate between."""

    dir: Path
    n: int

    @classmethod
    def make(cls, base: Path, lib: Path, n: int) -> Libs:
        d = base / f"libs{n}"
        if not (d / f"slot{n - 1}.so").exists():
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            for i in range(n):
                shutil.copyfile(lib, d / f"a{i}.so")
                shutil.copyfile(lib, d / f"b{i}.so")
                os.link(d / f"a{i}.so", d / f"slot{i}.so")
        return cls(d, n)

    def paths(self) -> list[Path]:
        return [self.dir / f"slot{i}.so" for i in range(self.n)]

    def restale(self) -> None:
        """Every slot now names the other twin: a new inode, the same bytes."""
        on_a = os.stat(self.dir / "slot0.so").st_ino == os.stat(self.dir / "a0.so").st_ino
        twin = "b" if on_a else "a"
        for i in range(self.n):
            tmp = self.dir / f"tmp{i}.so"
            tmp.unlink(missing_ok=True)
            os.link(self.dir / f"{twin}{i}.so", tmp)
            os.rename(tmp, self.dir / f"slot{i}.so")


def load_all(t: Target, paths: list[Path], chunk: int = 500) -> None:
    """dlopen every path; in chunks, so that neither pipe fills up (64 KiB) and deadlocks."""
    for i in range(0, len(paths), chunk):
        part = paths[i:i + chunk]
        send = b"".join(b"open " + os.fsencode(p) + b"\n" for p in part)
        (t._w.write if isinstance(t, FifoTarget) else t.proc.stdin.write)(send)  # type: ignore[union-attr]
        for _ in part:
            reply = t.readline()
            assert reply.startswith("ok"), reply


@dataclass
class Results:
    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def goal(self, name: str, what: str, measured: float, reference: float, bound: float, unit: str = "ms") -> None:
        ratio = measured / reference if reference else float("inf")
        ok = measured <= bound
        fmt = (lambda v: f"{v * 1000:.1f} ms") if unit == "ms" else (lambda v: f"{v:.1f} {unit}")
        self.rows.append((name, what, fmt(measured), f"{fmt(reference)} (bound {fmt(bound)})",
                          f"{ratio:.2f}  {'PASS' if ok else 'FAIL'}"))
        print("  ".join(self.rows[-1]), flush=True)  # progress; the table follows at the end

    def table(self) -> str:
        head = ("goal", "what", "measured", "reference", "ratio")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(5)]
        lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines.append("-|-".join("-" * w for w in widths))
        lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in self.rows]
        return "\n".join(lines)


def fix_runs(pid: int, libs: Libs, runs: int, extra: list[str] | None = None,
             refs: dict[str, list[str]] | None = None) -> tuple[list[float], list[int], dict[str, list[float]]]:
    """`runs` fixes of pid (each after a fresh simulated restore), each
    followed by one run of every reference: both see the same noise."""
    times, pauses = [], []
    ref_times: dict[str, list[float]] = {k: [] for k in refs or {}}
    for _ in range(runs):
        libs.restale()
        dt, out, _ = timed(LDFIX + ["fix", "--json", *(extra or []), str(pid)])
        doc = json.loads(out)
        procs = doc["processes"]
        assert all(p["error"] is None for p in procs), procs
        assert sum(len(p["rewritten"]) for p in procs) >= libs.n, "not every library was rewritten"
        times.append(dt)
        pauses.append(max(p["pause_us"] for p in procs))
        for k, argv in (refs or {}).items():
            ref_times[k].append(timed(argv)[0])
    return times, pauses, ref_times


def paired(measure: Callable[[], float], ref: list[str], runs: int,
           env: dict[str, str] | None = None) -> tuple[float, float]:
    """Medians of `measure` and of the reference, run alternately."""
    a, b = [], []
    for _ in range(runs):
        a.append(measure())
        b.append(timed(ref, env=env)[0])
    return median(a), median(b)


def reference(argv: list[str], runs: int) -> float:
    return median([timed(argv)[0] for _ in range(runs)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--only", default="", help="comma-separated goals (G1..G6,MEM)")
    ap.add_argument("--workdir", default="/dev/shm/ldfix-bench")
    args = ap.parse_args()
    only = {g.strip().upper() for g in args.only.split(",") if g.strip()}
    want = (lambda g: not only or g in only)
    runs = max(5, args.runs)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    fx = build_fixtures(work / "fixtures")
    res = Results()
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
          f"Linux {platform.release()}, Python {platform.python_version()}", flush=True)

    py_pass = reference([PY, "-c", "pass"], runs)
    res.notes.append(f"python -c pass: {py_pass * 1000:.1f} ms")

    libs1000 = Libs.make(work, fx.lib, 1000)
    w1 = Target([str(fx.target)], timeout=120)
    targets = [w1]
    try:
        load_all(w1, libs1000.paths())
        if want("G1") or want("G2") or want("G5") or want("G6") or want("MEM"):
            t_fix, pauses, refs = fix_runs(w1.pid, libs1000, runs,
                                           refs={"pass": [PY, "-c", "pass"], "pldd": ["pldd", str(w1.pid)]})
            w1_fix, py_pass = median(t_fix), median(refs["pass"])
            w1_own = max(w1_fix - py_pass, 0)  # W1's own work, above the interpreter's start
            res.goal("G1", "fix W1 (1000 stale libs) vs python -c pass", w1_fix, py_pass, 3 * py_pass)
            pldd = median(refs["pldd"])
            res.goal("G2", "pause W1 (1 thread) vs pldd run", median(pauses) / 1e6, pldd, pldd)
            w16 = Target([str(fx.target)], timeout=120)
            targets.append(w16)
            load_all(w16, libs1000.paths())
            assert w16.cmd("threads 15") == "ok"
            _t16, p16, refs16 = fix_runs(w16.pid, libs1000, runs, refs={"pldd": ["pldd", str(w16.pid)]})
            pldd16 = median(refs16["pldd"])
            res.goal("G2", "pause W1 (16 threads) vs pldd run", median(p16) / 1e6, pldd16, pldd16)
            w16.kill()
            targets.remove(w16)
        if want("G3"):
            dump, py_pass = paired(lambda: timed(LDFIX + ["dump", "--json", str(w1.pid)])[0],
                                   [PY, "-c", "pass"], runs)
            res.goal("G3", "dump --json W1 vs python -c pass", dump, py_pass, 3 * py_pass)
        if want("MEM"):
            import_rss = median([run_rss([PY, "-c", "import ldfix"], work) for _ in range(runs)])
            fix_rss = []
            for _ in range(runs):
                libs1000.restale()
                fix_rss.append(run_rss(LDFIX + ["fix", str(w1.pid)], work))
            res.goal("MEM", "peak RSS fix W1 vs import ldfix", median(fix_rss), import_rss, 2 * import_rss, "KiB")
        if want("G6"):
            env = dict(os.environ, CRTOOLS_SCRIPT_ACTION="pre-dump")
            ign, true = paired(lambda: timed([HOOK], env=env)[0], ["/bin/true"], max(runs, 21), env)
            res.goal("G6", "hook, ignored stage vs /bin/true", ign, true, 3 * true)

            def acting() -> float:
                libs1000.restale()
                os.kill(w1.pid, signal.SIGSTOP)
                try:
                    env = dict(os.environ, CRTOOLS_SCRIPT_ACTION="post-restore", CRTOOLS_INIT_PID=str(w1.pid))
                    return timed([HOOK], env=env)[0]
                finally:
                    os.kill(w1.pid, signal.SIGCONT)
            act, py_pass = paired(acting, [PY, "-c", "pass"], runs)
            res.goal("G6", "hook, acting stage on W1 vs python -c pass", act, py_pass, 3 * py_pass)
        if want("G4"):
            per: dict[int, float] = {}
            syscalls: dict[int, int] = {}
            for n in (10, 100, 1000, 5000):
                libs = libs1000 if n == 1000 else Libs.make(work, fx.lib, n)
                t = w1 if n == 1000 else Target([str(fx.target)], timeout=300)
                if t is not w1:
                    targets.append(t)
                    load_all(t, libs.paths())
                times, _, _ = fix_runs(t.pid, libs, runs)
                per[n] = median(times)
                libs.restale()
                subprocess.run(["strace", "-f", "-c", "-o", str(work / f"strace{n}.txt"), *LDFIX,
                                     "fix", str(t.pid)], capture_output=True, text=True)
                total = syscalls[n] = _strace_total(work / f"strace{n}.txt")
                res.notes.append(f"W2 n={n}: fix {per[n] * 1000:.1f} ms, {per[n] / n * 1e6:.1f} us/lib, "
                                 f"{total} syscalls ({total / n:.2f}/lib)")
                print("  " + res.notes[-1], flush=True)
                if t is not w1:
                    t.kill()
                    targets.remove(t)
            res.goal("G4", "time/lib at 5000 vs at 1000 (us)", per[5000] / 5000 * 1e6, per[1000] / 1000 * 1e6,
                     1.3 * per[1000] / 1000 * 1e6, "us")
            marg = [(syscalls[b] - syscalls[a]) / (b - a) for a, b in ((10, 100), (100, 1000), (1000, 5000))]
            res.notes.append("W2 marginal syscalls per library (10->100, 100->1000, 1000->5000): "
                             + ", ".join(f"{m:.2f}" for m in marg))
        if want("G5"):
            root = Target([str(fx.target)], timeout=120)
            targets.append(root)
            libs50 = Libs.make(work, fx.lib, 50)
            load_all(root, libs50.paths())
            fifo = Path(tempfile.mkdtemp(prefix="fifo", dir=work))
            kids = []
            for _ in range(99):
                k = FifoTarget(root, "serve", fifo)
                kids.append(k)
            for k in kids:
                load_all(k, libs50.paths())
            t_tree, _, refs = fix_runs(root.pid, libs50, runs, ["--tree"], refs={"pass": [PY, "-c", "pass"]})
            py_pass = median(refs["pass"])
            per_proc = w1_own / 20  # W3 has 50 libraries a process, W1 1000
            bound = 2 * (py_pass + 100 * per_proc)
            res.goal("G5", "fix --tree W3 (100 procs x 50 libs)", median(t_tree), py_pass + 100 * per_proc, bound)
            for k in kids:
                k.kill()
            shutil.rmtree(fifo, ignore_errors=True)
    finally:
        for t in targets:
            t.kill()
    print(res.table())
    for n in res.notes:
        print(f"  {n}")
    return 0


def _strace_total(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.strip().endswith("total"):
            return int(line.split()[3])
    return 0


if __name__ == "__main__":
    sys.exit(main())
