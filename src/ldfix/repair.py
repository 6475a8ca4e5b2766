"""The repair: plan outside the freeze, then under it check, write, read back.

DESIGN.md "The write protocol":
 1. plan: which address gets which 16 bytes, from a verified layout;
 2. freeze every thread (or know the target is held by its restorer);
 3. the loader must not be mid-change (r_state, load lock): else thaw, back
    off, retry (bounded);
 4. the planned objects must still be in the lists and still hold the old id;
    write all in one batched call; read back; thaw.
Nothing is written on any doubt, and the report says why."""

from __future__ import annotations

import os
import time
from typing import NamedTuple

from ldfix.api import Options, Session, open_session, pinned
from ldfix.errors import CorruptTarget, LayoutUnverified, LdfixError, LoaderBusy, NoSuchProcess, WriteFailed
from ldfix.errors import AccessDenied
from ldfix.freeze import Freeze, freeze, tracer_of
from ldfix.memory import Swapper, swap16
from ldfix.model import FileId, LoaderInfo, Record, Status
from ldfix.procfs import Process

MAX_ATTEMPTS = 20
PLAN_ATTEMPTS = 5
BACKOFF_START = 0.001
BACKOFF_MAX = 0.05


class Rewrite(NamedTuple):
    name: bytes
    namespace: int
    address: int       # of the id field in the target
    old: FileId
    new: FileId


class Skipped(NamedTuple):
    name: bytes
    namespace: int
    status: Status
    reason: str


class FixReport(Record):
    """What `fix` did to one process."""

    __slots__ = ("pid", "loader", "dry_run", "planned", "rewritten", "skipped", "pause_us", "freeze",
                 "attempts", "error", "exit_code")

    def __init__(self, pid: int, loader: LoaderInfo | None = None, dry_run: bool = False,
                 error: str | None = None, exit_code: int = 0) -> None:
        self.pid = pid
        self.loader = loader
        self.dry_run = dry_run
        self.planned: list[Rewrite] = []
        self.rewritten: list[Rewrite] = []
        self.skipped: list[Skipped] = []
        self.pause_us: int | None = None  # how long the target's threads were held
        self.freeze = ""                  # how the target was held
        self.attempts = 0
        self.error = error
        self.exit_code = exit_code


def _plan(session: Session) -> tuple[list[Rewrite], list[Skipped]]:
    ins = session.inspection
    if ins.busy and (ins.loader.layout_source is None or ins.partial):
        raise LoaderBusy(f"pid {ins.pid}: the loader is mid-change ({ins.busy})", pid=ins.pid)
    if ins.loader.layout_source is None:
        raise LayoutUnverified(f"pid {ins.pid}: nothing written: {ins.loader.layout_error}",
                               pid=ins.pid)
    if ins.partial:
        raise CorruptTarget(f"pid {ins.pid}: nothing written: the loader's lists do not hold "
                            f"together ({'; '.join(ins.warnings)})", pid=ins.pid)
    plan, skipped = [], []
    for o in ins.objects:
        if o.status is Status.STALE and o.writable and o.id_address and o.stored and o.current:
            plan.append(Rewrite(o.name, o.namespace, o.id_address, o.stored, o.current))
        else:
            reason = o.reason
            if o.status is Status.STALE:
                reason = f"stale, but not written ({o.role})"
            skipped.append(Skipped(o.name, o.namespace, o.status, reason))
    return plan, skipped


def _hold(session: Session, stopped_by: str | None) -> Freeze:
    """Freeze the target, or record why it need not (or cannot) be."""
    proc = session.proc
    if stopped_by:
        return Freeze(proc, mode=f"held by {stopped_by} (not attached)")
    if proc.pid == os.getpid():
        # ptrace cannot stop our own threads.  The load lock check below still
        # guards against a concurrent dlopen; a 16-byte store is all we do.
        return Freeze(proc, mode="self (own threads not stopped)")
    tracer, all_stopped = tracer_of(proc)
    if tracer:
        if all_stopped:
            return Freeze(proc, mode=f"already stopped by tracer pid {tracer} (not attached)")
        raise AccessDenied(f"pid {proc.pid}: traced by pid {tracer} and running: cannot hold it",
                           pid=proc.pid)
    return freeze(proc)


class Prepared(NamedTuple):
    """Everything the freeze needs, computed before it (the pause stays short)."""

    plan: list[Rewrite]
    owners: list[int]          # the object holding each planned id
    swap: Swapper              # check old values, write, read back: one call

    @classmethod
    def of(cls, session: Session, plan: list[Rewrite]) -> Prepared:
        owner = {o.id_address: o.address for o in session.inspection.objects if o.id_address}
        swap = swap16(session.mem, [rw.address for rw in plan], [rw.old.pack() for rw in plan],
                      [rw.new.pack() for rw in plan])
        return cls(plan, [owner[rw.address] for rw in plan], swap)


def _write_under_hold(session: Session, prep: Prepared) -> tuple[str | None, str]:
    """Checks and writes while held.  Returns (None, "") when written, else
    ("busy" | "replan", why): retry after a back-off, re-planning for "replan"."""
    mem, analysis = session.mem, session.analysis
    if not session.proc.still_same():
        raise NoSuchProcess(f"pid {session.proc.pid}: exited during the run (nothing written)",
                            pid=session.proc.pid)
    busy = analysis.busy(mem)
    if busy:
        return "busy", busy
    if analysis.members is None:
        raise CorruptTarget(f"pid {session.proc.pid}: cannot re-walk the loader's lists", pid=session.proc.pid)
    live = analysis.members(mem)
    for rw, owner in zip(prep.plan, prep.owners):
        if owner not in live:
            return "replan", f"object {rw.name!r} left the loader's lists"
    outcome, i = prep.swap()
    if outcome == "changed":
        return "replan", f"id at 0x{prep.plan[i].address:x} changed since planning"
    if outcome == "unwritten":
        raise WriteFailed(f"pid {session.proc.pid}: write at 0x{prep.plan[i].address:x} did not read back "
                          "as written", pid=session.proc.pid, address=prep.plan[i].address)
    return None, ""


def fix(pid: int, dry_run: bool = False, *, options: Options | None = None,
        stopped_by: str | None = None, max_attempts: int = MAX_ATTEMPTS) -> FixReport:
    """Rewrite every stale id of process `pid` to its file's current id.

    `stopped_by` names who holds the target's threads (e.g. "criu"), in which
    case ldfix does not attach.  Raises LdfixError when nothing could be done;
    returns the report otherwise."""
    proc = pinned(pid)  # one identity for every attempt: a pid taken meanwhile is refused
    try:
        return _fix(proc, dry_run, options, stopped_by, max_attempts)
    finally:
        proc.close()


def _fix(proc: Process, dry_run: bool, options: Options | None, stopped_by: str | None,
         max_attempts: int) -> FixReport:
    pid = proc.pid
    report = FixReport(pid=pid, dry_run=dry_run)
    pause_ns = 0
    delay = BACKOFF_START
    why = ""
    saw_busy = False
    while report.attempts < max_attempts:
        with open_session(proc, options) as session:
            report.pid = session.proc.pid
            report.loader = session.inspection.loader
            try:
                plan, report.skipped = _plan(session)
            except (LayoutUnverified, CorruptTarget, LoaderBusy) as exc:
                # A load or unload racing with the (unfrozen) planning reads can
                # make the lists look inconsistent: look again; a real
                # inconsistency persists and is reported as what it is.
                report.attempts += 1
                saw_busy = saw_busy or isinstance(exc, LoaderBusy)
                if report.attempts >= max_attempts or \
                        (not isinstance(exc, LoaderBusy) and report.attempts >= PLAN_ATTEMPTS):
                    if saw_busy and not isinstance(exc, LoaderBusy):
                        raise LoaderBusy(f"pid {pid}: nothing written after {report.attempts} attempt(s): "
                                         f"the loader was changing while planning ({exc})", pid=pid) from None
                    raise
                why = str(exc)
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            report.planned = plan
            if dry_run or not plan:
                report.freeze, report.pause_us = "none", 0
                return report
            prep = Prepared.of(session, plan)
            while report.attempts < max_attempts:
                report.attempts += 1
                if not proc.still_same():
                    raise NoSuchProcess(f"pid {pid}: exited during the run (nothing written)", pid=pid)
                fz = _hold(session, stopped_by)
                report.freeze = fz.mode
                with fz:
                    kind, why = _write_under_hold(session, prep)
                pause_ns += fz.pause_ns
                report.pause_us = pause_ns // 1000
                if kind is None:
                    report.rewritten = plan
                    return report
                if fz.mode.startswith(("held by", "already stopped")):
                    report.attempts = max_attempts  # held by someone else: waiting changes nothing
                    break
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                if kind == "replan":
                    break
    raise LoaderBusy(f"pid {report.pid}: nothing written after {report.attempts} attempt(s): {why}",
                     pid=report.pid)


__all__ = ["fix", "FixReport", "Rewrite", "Skipped", "LdfixError"]
