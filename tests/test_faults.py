"""Faults: every moment of a run is one at which the target, or ldfix itself,
may die, grow or lose threads, or return short reads.

(a) the target is killed at a random moment of `ldfix fix` (alone, or one
    process of a `--tree`): the run ends with a documented exit code, one
    line per error, no traceback, no hang; no survivor is left stopped.
(b) ldfix is killed (SIGKILL) at a random moment: the target runs on (no
    thread in a ptrace stop, it answers), and each id holds its old or its
    new 16 bytes, never a mix.
(c) threads appear and exit while the freeze is being taken.
(d) short reads: the live reader at the edge of a mapping, on both backends
    (process_vm_readv and, with that syscall blocked by seccomp, /proc/PID/mem).

The random loops use a fixed seed (LDFIX_FAULT_SEED).  LDFIX_FAULT_RUNS sets
how many runs (a) and (b) make (default 100 each); more by hand, e.g.
LDFIX_FAULT_RUNS=1000.  Each prints its tally (pytest -s shows it).

ldfix runs in a subprocess that has already imported everything a fix needs
and waits for a go: the random delay then covers the run itself (~10-30 ms),
not the interpreter's start-up.  A third of the runs set LDFIX_TEST_HOLD_MS
(freeze.py: the threads stay held that long) so that kills land inside the
freeze as well.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest
from helpers import FIXTURE_SRC, FifoTarget, Fixtures, Target, replace_with_copy

import ldfix
from ldfix.errors import ExitCode
from ldfix.memory import (
    WALK_UNREADABLE,
    ProcessMemory,
    swap16,
)

RUNS = int(os.environ.get("LDFIX_FAULT_RUNS", "100"))
SEED = int(os.environ.get("LDFIX_FAULT_SEED", "8"))
HOLD_MS = 20
HANG = 30.0  # seconds: a run that takes longer is a hang

# Every exit code README documents for `fix`, but 70 (internal error: a bug)
# and those `fix` never gives (2 usage, 8 check).
CLEAN_EXITS = {ExitCode.OK, ExitCode.PARTIAL, ExitCode.NO_PROCESS, ExitCode.ACCESS, ExitCode.UNSUPPORTED,
               ExitCode.UNVERIFIED, ExitCode.CORRUPT, ExitCode.BUSY, ExitCode.WRITE_FAILED}


# --- ldfix in a subprocess, imported and waiting for a go -----------------------------------

DRIVER = r"""
import json, sys
import ldfix.cli, ldfix.api, ldfix.repair, ldfix.report, ldfix.freeze, ldfix.identity, ldfix.tree
import ldfix.layout, ldfix.loaders.glibc, ldfix.loaders.musl, ldfix.native
sys.stdout.write("ready\n")
sys.stdout.flush()
argv = json.loads(sys.stdin.readline())
sys.exit(ldfix.cli.main(argv))
"""


class Driver:
    def __init__(self, hold_ms: int = 0) -> None:
        env = dict(os.environ)
        env.pop("LDFIX_TEST_HOLD_MS", None)
        if hold_ms:
            env["LDFIX_TEST_HOLD_MS"] = str(hold_ms)
        self.p = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert self.p.stdout is not None
        if not select.select([self.p.stdout], [], [], HANG)[0]:
            self.p.kill()
            raise TimeoutError("the ldfix driver did not start")
        line = self.p.stdout.readline()
        assert line == b"ready\n", (line, self.p.stderr.read() if self.p.stderr else b"")
        self.t0 = 0.0

    def go(self, *argv: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(json.dumps(list(argv)).encode() + b"\n")
        self.p.stdin.flush()
        self.t0 = time.monotonic()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.p.poll() is None:  # a test failed before the run ended: never leave it behind
            self.p.kill()
            self.p.communicate()

    def finish(self) -> tuple[int, str, str, float]:
        try:
            out, err = self.p.communicate(timeout=HANG)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.communicate()
            pytest.fail(f"ldfix hung: still running after {HANG:.0f} s")
        return self.p.returncode, out.decode(), err.decode(), time.monotonic() - self.t0


def assert_clean(rc: int, out: str, err: str, max_errors: int) -> None:
    assert rc in CLEAN_EXITS, f"exit {rc}: {err!r}"
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = err.splitlines()
    assert len(lines) <= max_errors, err
    assert all(line.startswith("ldfix: error: ") for line in lines), err
    if rc == ExitCode.OK:
        assert err == ""
    else:
        assert lines, f"exit {rc} without a word on stderr"


def states(pid: int) -> list[str]:
    """The state letter of every thread of pid ([] once it is gone)."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                out.append(f.read().rsplit(b")", 1)[1].split()[0].decode())
        except (OSError, IndexError):
            pass
    return out


def assert_runs_on(pid: int, answer: callable, within: float = 2.0) -> None:  # type: ignore[valid-type]
    """No thread of pid stays in a ptrace stop (the kernel resumes the
    tracees of a dead tracer as it exits: allow it a moment), and it answers."""
    deadline = time.monotonic() + within
    while "t" in (st := states(pid)):
        if time.monotonic() > deadline:
            pytest.fail(f"pid {pid} left stopped: thread states {st}")
        time.sleep(0.002)
    assert "T" not in st, st
    assert answer() == "ok"


def copies(fx: Fixtures, d: Path, n: int) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = d / f"lib{i}.so"
        shutil.copy2(fx.lib, p)
        out.append(p)
    return out


def typical_run(fx: Fixtures, tmp: Path, argv_for: callable, setup: callable) -> float:  # type: ignore[valid-type]
    """Median time of an unkilled run, go to exit (seconds)."""
    times = []
    for i in range(5):
        with Target([str(fx.target)]) as t:
            setup(t, tmp / f"cal{i}")
            with Driver() as d:
                d.go(*argv_for(t))
                rc, _out, err, secs = d.finish()
            assert rc == 0, err
            times.append(secs)
    return statistics.median(times)


# --- (a) the target dies at a random moment -----------------------------------------------------

def _prepare(t: Target, d: Path, fx: Fixtures) -> list[Path]:
    libs = copies(fx, d, 2)
    for lib in libs:
        t.open(lib)
    assert t.cmd("threads 3") == "ok"
    for lib in libs:
        replace_with_copy(lib)
    return libs


@pytest.mark.slow
def test_target_killed_at_random_moments(fx: Fixtures, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    typical = typical_run(fx, tmp_path, lambda t: ["fix", str(t.pid)],
                          lambda t, d: _prepare(t, d, fx))
    tally: Counter[str] = Counter()
    started = time.monotonic()
    for i in range(RUNS):
        run = tmp_path / f"run{i}"
        hold = HOLD_MS if i % 3 == 2 else 0
        tree = i % 2 == 1
        with Driver(hold) as driver, Target([str(fx.target)]) as parent:
            _prepare(parent, run / "p", fx)
            child = None
            if tree:
                child = FifoTarget(parent, "serve", run / "fifo")
                for lib in copies(fx, run / "c", 2):
                    child.open(lib)
                    replace_with_copy(lib)
            victim = child if (tree and rng.random() < 0.5) else parent
            survivor = parent if victim is child else child
            delay = rng.uniform(0, typical + hold / 1000)
            driver.go("fix", *(["--tree"] if tree else []), str(parent.pid))
            time.sleep(delay)
            if "t" in states(victim.pid):
                tally["killed while held"] += 1
            os.kill(victim.pid, signal.SIGKILL)
            rc, out, err, _secs = driver.finish()
            tally[f"exit {rc}"] += 1
            assert_clean(rc, out, err, max_errors=2 if tree else 1)
            if survivor is not None:
                assert_runs_on(survivor.pid, lambda s=survivor: s.cmd("threads 0"))
            if child is not None:
                child.kill()
        assert "t" not in states(victim.pid)  # gone, or a zombie: not stopped
    elapsed = time.monotonic() - started
    print(f"\n(a) target killed: {RUNS} runs in {elapsed:.1f} s, typical fix {typical * 1000:.1f} ms, "
          f"seed {SEED}: {dict(sorted(tally.items()))}")
    assert tally["exit 0"] + tally["exit 3"] + tally["exit 1"] > 0


# --- (b) ldfix dies at a random moment ----------------------------------------------------------

def _read16(pid: int, addrs: list[int]) -> list[bytes]:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        out = []
        for a in addrs:
            f.seek(a)
            out.append(f.read(16))
        return out


@pytest.mark.slow
def test_ldfix_killed_at_random_moments(fx: Fixtures, tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    typical = typical_run(fx, tmp_path, lambda t: ["fix", str(t.pid)],
                          lambda t, d: _prepare(t, d, fx))
    tally: Counter[str] = Counter()
    libs = copies(fx, tmp_path / "libs", 4)
    started = time.monotonic()
    with Target([str(fx.target)], timeout=5) as t:
        first = [t.open(lib).handle for lib in libs]
        assert t.cmd("threads 3") == "ok"
        for i in range(RUNS):
            for lib in libs:
                replace_with_copy(lib)
            plan = ldfix.fix(t.pid, dry_run=True).planned
            assert len(plan) == len(libs)
            addrs = [rw.address for rw in plan]
            old = [rw.old.pack() for rw in plan]
            new = [rw.new.pack() for rw in plan]
            hold = HOLD_MS if i % 3 == 2 else 0
            with Driver(hold) as driver:
                delay = rng.uniform(0, typical + hold / 1000)
                driver.go("fix", str(t.pid))
                time.sleep(delay)
                if "t" in states(t.pid):
                    tally["killed while held"] += 1
                driver.p.kill()
                rc, _out, err, _secs = driver.finish()
            tally["finished before the kill" if rc == 0 else f"killed (exit {rc})"] += 1
            assert rc in (0, -signal.SIGKILL), err
            assert_runs_on(t.pid, lambda: t.cmd("threads 0"))
            now = _read16(t.pid, addrs)
            for a, n, o, w in zip(addrs, now, old, new):
                assert n in (o, w), f"id at 0x{a:x} is torn: {n.hex()} (old {o.hex()}, new {w.hex()})"
            kind = "all new" if now == new else "all old" if now == old else "some new"
            tally[kind] += 1
            if rc == 0:
                assert kind == "all new"
        # Whatever the kills left, a last run repairs everything.
        for lib in libs:
            replace_with_copy(lib)
        assert len(ldfix.fix(t.pid).rewritten) == len(libs)
        alias = tmp_path / "alias.so"
        alias.symlink_to(libs[0])
        assert t.open(alias).handle == first[0]
    elapsed = time.monotonic() - started
    print(f"\n(b) ldfix killed: {RUNS} runs in {elapsed:.1f} s, typical fix {typical * 1000:.1f} ms, "
          f"seed {SEED + 1}: {dict(sorted(tally.items()))}")
    assert tally["all old"] > 0  # the kills did land before the write


# --- (c) threads appear and exit during the freeze ------------------------------------------------

@pytest.fixture(scope="module")
def churn_lib(fx: Fixtures, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("churn") / "libldfix_threadchurn.so"
    subprocess.run([fx.cc, "-O2", "-Wall", "-shared", "-fPIC", "-pthread", "-o", str(out),
                    str(FIXTURE_SRC / "threadchurn.c")], check=True)
    return out


def test_threads_appear_and_exit_during_the_freeze(fx: Fixtures, churn_lib: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import ldfix.freeze as freeze_mod
    from ldfix import native
    from ldfix.procfs import Process

    seen: Counter[str] = Counter()
    widen = False
    listings: list[list[int]] = []
    first: list[int] = []  # the listing the freeze started from
    real_tasks, real_seize, real_wait = Process.tasks, native.ptrace_seize, freeze_mod._wait_stop

    def tasks(self: Process) -> list[int]:
        got = real_tasks(self)
        listings.append(list(got))
        return got

    def seize(tid: int, options: int = 0) -> None:
        if not first:
            first.append(len(listings) - 1)
            seen["freezes"] += 1
            if widen:
                # ldfix preempted between listing the threads and seizing
                # them (a loaded machine): the churn goes on meanwhile.
                time.sleep(0.002)
        try:
            real_seize(tid, options)
        except OSError as exc:
            seen[f"seize: {os.strerror(exc.errno or 0)} (exited before seize)"] += 1
            raise
        if tid not in listings[first[0]]:
            seen["seized in a later round (appeared during the freeze)"] += 1

    def wait_stop(tid: int, deadline: float) -> int | None:
        sig = real_wait(tid, deadline)
        if sig is None:
            seen["exited between seize and stop"] += 1
        return sig

    monkeypatch.setattr(Process, "tasks", tasks)
    monkeypatch.setattr(native, "ptrace_seize", seize)
    monkeypatch.setattr(freeze_mod, "_wait_stop", wait_stop)

    runs = max(30, RUNS // 2)
    lib = copies(fx, tmp_path, 1)[0]
    with Target([str(fx.target)], timeout=5) as t:
        opened = t.open(lib)
        assert t.cmd(f"open {churn_lib}").startswith("ok handle=")
        time.sleep(0.05)
        for i in range(runs):
            widen = i % 2 == 1
            replace_with_copy(lib)
            listings.clear()
            first.clear()
            rep = ldfix.fix(t.pid)
            assert [r.name for r in rep.rewritten] == [os.fsencode(lib)]
            assert rep.freeze == "ptrace"
            seen["task listings while freezing"] += len(listings) - first[0]
            assert_runs_on(t.pid, lambda: t.cmd("threads 0"))
        monkeypatch.undo()
        # The CLI as well, with the churn still going.
        for _ in range(3):
            replace_with_copy(lib)
            r = subprocess.run([sys.executable, "-m", "ldfix", "fix", str(t.pid)], capture_output=True,
                               text=True, timeout=HANG, check=False)
            assert r.returncode == 0 and r.stderr == "", r.stderr
            assert "rewrote 1 id(s)" in r.stdout
        alias = tmp_path / "alias.so"
        alias.symlink_to(lib)
        assert t.open(alias).handle == opened.handle
        assert_runs_on(t.pid, lambda: t.cmd("threads 0"))
    print(f"\n(c) thread churn: {runs} fixes: {dict(sorted(seen.items()))}")
    assert seen["seized in a later round (appeared during the freeze)"] > 0
    assert seen["exited between seize and stop"] + sum(v for k, v in seen.items() if k.startswith("seize:")) > 0


# --- (d) short reads --------------------------------------------------------------------------

PAGE = 4096

# A child process that lays out, from BASE: page 0 readable (a pattern), page 1
# unmapped, page 2 PROT_NONE, page 3 read-only, page 4 read-write holding a
# string without NUL that runs to its end, page 5 unmapped, page 6 holding a
# two-node list whose second node is cut by page 7, unmapped.  It prints
# BASE, then waits.
EDGE_CHILD = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
P = 4096
a = libc.mmap(None, 8 * P, 3, 0x22, -1, 0)
ctypes.memmove(a, bytes(range(256)) * (8 * P // 256), 8 * P)
ctypes.memmove(a + 4 * P, b"/lib/" + b"x" * (P - 5), P)
# A two-node list (next at 0, prev at 8) whose second node straddles the end of page 6.
A, B = a + 6 * P + 64, a + 7 * P - 24
ctypes.memmove(A, (B).to_bytes(8, "little") + bytes(8), 16)
ctypes.memmove(B, bytes(8) + (A).to_bytes(8, "little"), 16)
assert libc.munmap(a + P, P) == 0 and libc.munmap(a + 5 * P, P) == 0 and libc.munmap(a + 7 * P, P) == 0
assert libc.mprotect(a + 2 * P, P, 0) == 0 and libc.mprotect(a + 3 * P, P, 1) == 0
print(a, flush=True)
sys.stdin.read()
"""

# Runs the same reads in a process where process_vm_readv/writev fail with
# ENOSYS (seccomp), so that ldfix's native layer falls back to /proc/PID/mem.
SECCOMP_PRELUDE = r"""
import ctypes, struct
_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

def block_process_vm(nrs=(310, 311)):  # x86_64 process_vm_readv, process_vm_writev (or others: ENOSYS)
    prog = [(0x20, 0, 0, 4), (0x15, 0, len(nrs) + 1, 0xC000003E), (0x20, 0, 0, 0)]
    prog += [(0x15, len(nrs) - i, 0, nr) for i, nr in enumerate(nrs)]
    prog += [(0x06, 0, 0, 0x7FFF0000), (0x06, 0, 0, 0x00050000 | 38)]  # ALLOW, ERRNO(ENOSYS)
    filt = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(filt)))
    assert _libc.prctl(38, 1, 0, 0, 0) == 0                               # PR_SET_NO_NEW_PRIVS
    assert _libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0) == 0, ctypes.get_errno()  # SECCOMP_MODE_FILTER
    _libc.syscall.restype = ctypes.c_long
    assert _libc.syscall(nrs[0], -1, 0, 0, 0, 0, 0) == -1 and ctypes.get_errno() == 38
"""

PROBE = r"""
import json, os, sys
from ldfix import memory
from ldfix.errors import LdfixError
pid, base, P = int(sys.argv[1]), int(sys.argv[2]), 4096
m = memory.ProcessMemory(pid)
out = {}
regions = [(base + P - 8, 16), (base, 8), (base + P, 8), (base + 3 * P, 8), (base + 4 * P - 4, 8),
           (base + 5 * P - 3, 16), (base + P - 4096, 3 * 4096), (1 << 47, 8), (base + 4 * P, 8)]
out["read"] = [g.hex() for g in m.read_many(regions)]
many = [(base + (i % 6) * P + 8 * i % P, 8) for i in range(3000)]  # > IOV_MAX regions, faults interleaved
out["many"] = [len(g) for g in m.read_many(many)]
out["cstring"] = [memory.read_cstring(m, base + 4 * P + 5, 8192)[1], len(memory.read_cstring(m, base + 4 * P, 8192)[0])]
try:
    memory.read_cstring(m, base + P, 64)
    out["cstring_in_hole"] = "read"
except LdfixError as exc:
    out["cstring_in_hole"] = type(exc).__name__
try:
    memory.read(m, base + P - 8, 16)
    out["read_exact"] = "read"
except LdfixError as exc:
    out["read_exact"] = type(exc).__name__
# A list whose second node straddles the edge into the hole.
nodes, stop, at = memory.walk_list(m, base + 6 * P + 64, 0, 8, 64, 56, 10)
out["walk"] = [[a - base for a, _ in nodes], [len(r) for _, r in nodes], stop, at - base]
out["prot_none"] = len(m.read_many([(base + 2 * P, 8)])[0])
print(json.dumps(out))
"""


@pytest.fixture
def edge_child() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    p = subprocess.Popen([sys.executable, "-c", EDGE_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None
        base = int(p.stdout.readline())
        yield p, base
    finally:
        p.kill()
        p.wait()


def _probe(pid: int, base: int, fallback: bool) -> dict[str, object]:
    code = (SECCOMP_PRELUDE + "\nblock_process_vm()\n" if fallback else "") + PROBE
    r = subprocess.run([sys.executable, "-c", code, str(pid), str(base)], capture_output=True, text=True,
                       timeout=HANG, check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_short_reads_at_mapping_edges_on_both_backends(edge_child: tuple[subprocess.Popen[bytes], int]) -> None:
    p, base = edge_child
    live = _probe(p.pid, base, fallback=False)
    pattern = (bytes(range(256)) * 32)
    reads = [bytes.fromhex(h) for h in live["read"]]  # type: ignore[union-attr]
    assert reads[0] == pattern[PAGE - 8:PAGE]             # cut at the hole: the readable part
    assert reads[1] == pattern[:8]                        # the batch goes on after a fault
    assert reads[2] == b""                                # the hole
    assert reads[3] == pattern[:8]                        # read-only page: readable
    assert reads[4] == pattern[PAGE - 4:PAGE] + b"/lib"   # across two readable pages
    assert reads[5] == b"xxx"                             # page 4 ends, page 5 is unmapped
    assert reads[6] == pattern[:PAGE]                     # a large region stops at the hole
    assert reads[7] == b""                                # above the user address space (x86_64)
    assert reads[8] == b"/lib/xxx"
    many = live["many"]
    assert many == [0 if (i % 6) in (1, 2, 5) else 8 for i in range(3000)]  # type: ignore[comparison-overlap]
    assert live["cstring"] == [False, PAGE]              # no NUL before the hole: incomplete
    assert live["cstring_in_hole"] == "MemoryFault"
    assert live["read_exact"] == "MemoryFault"
    assert live["walk"] == [[6 * PAGE + 64], [64], WALK_UNREADABLE, 7 * PAGE - 24]

    fallback = _probe(p.pid, base, fallback=True)
    # /proc/PID/mem (FOLL_FORCE) reads PROT_NONE pages, which process_vm_readv
    # does not: the one documented difference (SECURITY.md, known limits).
    assert live["prot_none"] == 0 and fallback.pop("prot_none") == 8
    live.pop("prot_none")
    fb_many = fallback.pop("many")
    assert fb_many == [0 if (i % 6) in (1, 5) else 8 for i in range(3000)]  # type: ignore[comparison-overlap]
    live.pop("many")
    assert fallback == live


WILD_PROBE = r"""
import json, sys
from ldfix import memory
pid, base, P = int(sys.argv[1]), int(sys.argv[2]), 4096
m = memory.ProcessMemory(pid)
wild = [0xFFFF_8000_0000_0000, (1 << 64) - 8, 1 << 63]  # kernel addresses, as a hostile l_name may hold
got = m.read_many([(base, 8), *((w, 8) for w in wild), (base + 4 * P, 8)])
names = memory.read_cstring(m, base + 4 * P, 16)
print(json.dumps([len(g) for g in got]))
"""


@pytest.mark.parametrize("fallback", [
    False,
    True,
], ids=["process_vm_readv", "proc-pid-mem"])
def test_wild_pointer_faults_one_region_only(fallback: bool, edge_child: tuple[subprocess.Popen[bytes], int]) -> None:
    """A kernel address among good ones (a hostile l_name) comes back empty on
    either backend; the other regions are read."""
    p, base = edge_child
    code = (SECCOMP_PRELUDE + "\nblock_process_vm()\n" if fallback else "") + WILD_PROBE
    r = subprocess.run([sys.executable, "-c", code, str(p.pid), str(base)], capture_output=True, text=True,
                       timeout=HANG, check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [8, 0, 0, 0, 8]


WRITE_PROBE = r"""
import json, sys
from ldfix import memory
pid, base, P = int(sys.argv[1]), int(sys.argv[2]), 4096
m = memory.ProcessMemory(pid)
old = m.read_many([(base + 3 * P, 16)])[0]
print(json.dumps(memory.swap16(m, [base + 3 * P], [old], [b"N" * 16])()))
"""


@pytest.mark.parametrize("fallback", [
    False,
    True,
], ids=["process_vm_writev", "proc-pid-mem"])
def test_swap_never_writes_a_read_only_page(fallback: bool, edge_child: tuple[subprocess.Popen[bytes], int]) -> None:
    """An id that sits in a page the target cannot write is refused on either
    backend: swap16 reports it unwritten and the page keeps its bytes."""
    p, base = edge_child
    code = (SECCOMP_PRELUDE + "\nblock_process_vm()\n" if fallback else "") + WRITE_PROBE
    r = subprocess.run([sys.executable, "-c", code, str(p.pid), str(base)], capture_output=True, text=True,
                       timeout=HANG, check=False)
    assert r.returncode == 0, r.stderr
    with open(f"/proc/{p.pid}/mem", "rb", buffering=0) as f:
        f.seek(base + 3 * PAGE)
        after = f.read(16)
    assert after != b"N" * 16, "written into a read-only page"
    assert json.loads(r.stdout) == ["unwritten", 0]


def test_fix_through_the_proc_pid_mem_fallback(target: Target, libdir: Path, tmp_path: Path) -> None:
    """process_vm_readv/writev refused (seccomp, as in some container
    profiles): ldfix falls back to /proc/PID/mem and the repair still works."""
    lib = libdir / "libldfix_demo.so"
    first = target.open(lib)
    assert target.cmd("threads 2") == "ok"
    replace_with_copy(lib)
    code = SECCOMP_PRELUDE + "\nblock_process_vm()\nimport sys\nfrom ldfix.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    r = subprocess.run([sys.executable, "-c", code, "fix", str(target.pid)], capture_output=True, text=True,
                       timeout=HANG, check=False)
    assert r.returncode == 0, r.stderr
    assert "rewrote 1 id(s)" in r.stdout
    alias = tmp_path / "alias.so"
    alias.symlink_to(lib)
    assert target.open(alias).handle == first.handle
    assert_runs_on(target.pid, lambda: target.cmd("threads 0"))


def test_swap_with_a_faulting_id_writes_nothing(edge_child: tuple[subprocess.Popen[bytes], int]) -> None:
    """Live swap16: one id of the batch in the hole: reported, and no id written."""
    p, base = edge_child
    m = ProcessMemory(p.pid)
    try:
        addrs = [base + 4 * PAGE + 64, base + PAGE + 64, base + 4 * PAGE + 128]
        old = m.read_many([(a, 16) for a in addrs])
        assert [len(o) for o in old] == [16, 0, 16]
        before = m.read_many([(base + 4 * PAGE, PAGE)])[0]
        outcome = swap16(m, addrs, [old[0], bytes(16), old[2]], [b"A" * 16, b"B" * 16, b"C" * 16])()
        assert outcome == ("changed", 1)
        assert m.read_many([(base + 4 * PAGE, PAGE)])[0] == before
    finally:
        m.close()


@pytest.mark.parametrize("fallback", [
    False,
    True,
], ids=["process_vm_readv", "proc-pid-mem"])
def test_hostile_l_name_on_a_live_target(fallback: bool, target: Target, libdir: Path) -> None:
    """A live target whose link_map names a kernel address (as a hostile
    process can make it): dump ends with a documented result on either backend."""
    target.open(libdir / "libldfix_demo.so")
    obj = next(o for o in ldfix.inspect(target.pid).objects if o.name.endswith(b"libldfix_demo.so"))
    with open(f"/proc/{target.pid}/mem", "r+b", buffering=0) as f:  # the target "writes its own memory"
        f.seek(obj.address + 8)
        f.write(struct.pack("<Q", 0xFFFF_8000_0000_0000))
    code = ((SECCOMP_PRELUDE + "\nblock_process_vm()\n" if fallback else "")
            + "import sys\nfrom ldfix.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, "dump", "--json", str(target.pid)], capture_output=True,
                       text=True, timeout=HANG, check=False)
    assert_clean(r.returncode, r.stdout, r.stderr, max_errors=1)
    if r.returncode == 0:
        names = [o["name"] for o in json.loads(r.stdout)["objects"]]
        assert not any(n.endswith("libldfix_demo.so") for n in names)


def _respawn_at(pid: int, argv: list[str], tries: int = 5) -> Target | None:
    """A new Target given exactly `pid` (free by now), as CRIU does it:
    /proc/sys/kernel/ns_last_pid set to pid - 1 just before the fork."""
    for _ in range(tries):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
        except OSError as exc:
            pytest.skip(f"cannot write ns_last_pid: {exc.strerror}")
        t = Target(argv)
        if t.pid == pid:
            return t
        t.kill()  # another fork came first
    return None


@pytest.mark.parametrize("pin", ["pidfd", "start time"])
def test_a_pid_reused_between_plan_and_write_gets_nothing(pin: str, fx: Fixtures, libdir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """(e) The analysed process exits after planning and a new process gets
    its pid: without address randomisation and with the old file loaded, the
    newcomer even holds the planned old id at the planned address, so only
    the pinned identity (a pidfd, or without one the start time) stands
    between ldfix and a write into it."""
    import errno as errno_mod

    import ldfix.repair as repair
    from ldfix.errors import NoSuchProcess

    if pin == "start time":
        def no_pidfd(pid: int, flags: int = 0) -> int:
            raise OSError(errno_mod.ENOSYS, "pidfd_open: not implemented")
        monkeypatch.setattr(os, "pidfd_open", no_pidfd)

    lib = libdir / "libldfix_demo.so"
    argv = ["setarch", os.uname().machine, "-R", str(fx.target)]
    victim = Target(argv)
    victim.open(lib)
    replace_with_copy(lib)                        # the old inode stays as libldfix_demo.so.old0
    old_file = libdir / "libldfix_demo.sp"        # as long a path: the same heap layout
    os.link(libdir / "libldfix_demo.so.old0", old_file)
    (planned,) = [o for o in ldfix.inspect(victim.pid).objects if o.name == os.fsencode(lib)]
    pid = victim.pid
    newcomer: list[Target] = []
    real_hold = repair._hold

    def hold(session, stopped_by):  # type: ignore[no-untyped-def]
        if not newcomer:
            victim.kill()  # killed and reaped: the pid is free
            t = _respawn_at(pid, argv)
            if t is None:
                pytest.skip(f"pid {pid} could not be given to a new process")
            newcomer.append(t)
            t.open(old_file)
        return real_hold(session, stopped_by)

    monkeypatch.setattr(repair, "_hold", hold)
    try:
        with pytest.raises(NoSuchProcess, match="exited during the run \\(nothing written\\)"):
            repair.fix(pid)
        (t,) = newcomer
        assert t.alive() and t.cmd("threads 1") == "ok"  # released, running
        (mine,) = [o for o in ldfix.inspect(t.pid).objects if o.name == os.fsencode(old_file)]
        # The premise: the newcomer offered exactly what the plan would have overwritten.
        assert (mine.id_address, mine.stored) == (planned.id_address, planned.stored)
        assert mine.stored != planned.current  # and it still holds it: nothing was written
    finally:
        victim.kill()
        for t in newcomer:
            t.kill()
