"""Holding a target still while its loader data is written.

Every thread is stopped with PTRACE_SEIZE + PTRACE_INTERRUPT (no signal is
sent, nothing the program can observe), threads that appear meanwhile are
caught by re-listing /proc/PID/task until the set is stable, and every one is
detached again with the signal it was about to take, if any.  If ldfix dies
while holding them, the kernel detaches them and they run on."""

from __future__ import annotations

import errno
import os
import time

from ldfix import native
from ldfix.errors import AccessDenied, LdfixError, NoSuchProcess
from ldfix.procfs import DEAD_STATES, Process, stat_fields

STOP_TIMEOUT = 2.0     # seconds a thread may take to reach its ptrace stop
MAX_ROUNDS = 64        # re-listings of /proc/PID/task while threads keep appearing


class Freeze:
    """How the target is held.  `mode` is reported in every fix report."""

    __slots__ = ("proc", "mode", "held", "started_ns", "pause_ns")

    def __init__(self, proc: Process, mode: str = "none") -> None:
        self.proc = proc
        self.mode = mode
        self.held: dict[int, int] = {}   # tid -> signal to re-inject at detach
        self.started_ns = 0
        self.pause_ns = 0

    def __enter__(self) -> Freeze:
        return self

    def __exit__(self, *exc: object) -> None:
        self.thaw()

    def thaw(self) -> None:
        for tid, sig in list(self.held.items()):
            try:
                native.ptrace_detach(tid, sig)
            except OSError:
                pass  # exited meanwhile
            del self.held[tid]
        if self.started_ns:
            self.pause_ns += time.monotonic_ns() - self.started_ns
            self.started_ns = 0


def tracer_of(proc: Process) -> tuple[int, bool]:
    """(tracer pid or 0, whether every thread is in a ptrace stop)."""
    tracer, all_stopped = 0, True
    for tid in proc.tasks():
        st = proc.task_status(tid)
        t = int(st.get("TracerPid", "0") or 0)
        if t:
            tracer = t
        if not st.get("State", "").startswith("t"):
            all_stopped = False
    return tracer, all_stopped and tracer != 0


def _wait_stop(tid: int, deadline: float) -> int | None:
    """Wait for `tid`'s ptrace stop; returns the signal to re-inject, or None if it exited."""
    delay = 20e-6
    spins = 0
    while True:
        try:
            got, status = native.waitpid(tid, os.WNOHANG)
        except OSError as exc:
            if exc.errno == errno.ECHILD:
                return None
            raise
        if got:
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                return None
            if os.WIFSTOPPED(status):
                sig, event = os.WSTOPSIG(status), status >> 16
                if event:  # interrupt or group stop: nothing to pass on
                    return 0
                return sig  # signal-delivery stop: give the signal back at detach
        if spins < 200:  # a PTRACE_INTERRUPT stop takes microseconds: yield before sleeping
            spins += 1
            os.sched_yield()
            continue
        if _exited(tid):
            # Killed meanwhile.  A thread-group leader that exited is not
            # reported while other (traced) threads are unreaped: it would
            # never stop, and its waitpid never return.
            return None
        if time.monotonic() > deadline:
            raise LdfixError(f"thread {tid} did not stop within {STOP_TIMEOUT:.0f} s "
                             "(uninterruptible sleep?)")
        time.sleep(delay)
        delay = min(delay * 2, 5e-3)


def _exited(tid: int) -> bool:
    """Whether thread `tid` is gone or a zombie."""
    fields = stat_fields(f"/proc/{tid}")
    return not fields or fields[0] in DEAD_STATES


def _test_hold() -> None:
    """LDFIX_TEST_HOLD_MS keeps the target stopped that long: a test aid that
    lets the tests kill ldfix while it holds a target (never set in use)."""
    ms = os.environ.get("LDFIX_TEST_HOLD_MS")
    if ms:
        time.sleep(int(ms) / 1000)


def freeze(proc: Process) -> Freeze:
    """Stop every thread of `proc`; the caller must thaw (use as a context manager)."""
    fz = Freeze(proc, mode="ptrace")
    fz.started_ns = time.monotonic_ns()
    try:
        for _ in range(MAX_ROUNDS):
            new = [t for t in proc.tasks() if t not in fz.held]
            if not new:
                _test_hold()
                return fz
            seized = []
            for tid in new:
                try:
                    native.ptrace_seize(tid)
                except OSError as exc:
                    if exc.errno == errno.ESRCH:
                        continue  # the thread exited
                    if exc.errno == errno.EPERM and not proc.task_status(tid):
                        continue
                    if exc.errno == errno.EPERM:
                        raise AccessDenied(f"pid {proc.pid}: cannot ptrace thread {tid}: "
                                           "traced by another process, or not permitted",
                                           pid=proc.pid) from None
                    raise
                native.ptrace_interrupt(tid)
                seized.append(tid)
            deadline = time.monotonic() + STOP_TIMEOUT
            for tid in seized:
                sig = _wait_stop(tid, deadline)
                if sig is not None:
                    fz.held[tid] = sig
            if not fz.held and not proc.alive():
                raise NoSuchProcess(f"pid {proc.pid}: exited while being stopped", pid=proc.pid)
        raise LdfixError(f"pid {proc.pid}: threads keep appearing; could not stop them all")
    except BaseException:
        fz.thaw()
        raise
