"""The public API: `inspect(pid)` and (repair.py) `fix(pid)`."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

from ldfix.errors import CorruptTarget, LdfixError, NoSuchProcess, UnsupportedTarget, from_oserror
from ldfix.identity import RootView
from ldfix.layout import ALL_SOURCES, DEFAULT_DEBUG_DIRS
from ldfix.loaders.base import Analysis
from ldfix.memory import ProcessMemory
from ldfix.model import Inspection
from ldfix.procfs import Process, arch_name, check_target
from ldfix.target import TargetView, open_target


INSPECT_ATTEMPTS = 5


class Options(NamedTuple):
    """Knobs shared by inspect and fix."""

    debug_dirs: Sequence[str] = DEFAULT_DEBUG_DIRS
    sources: frozenset[str] = ALL_SOURCES   # layout sources allowed (diagnosis, tests)

    @classmethod
    def from_env(cls) -> Options:
        raw = os.environ.get("LDFIX_DEBUG_DIRS")
        dirs = DEFAULT_DEBUG_DIRS if raw is None else tuple(d for d in raw.split(":") if d)
        src = os.environ.get("LDFIX_LAYOUT_SOURCES")
        sources = ALL_SOURCES if src is None else frozenset(s for s in src.split(",") if s) & ALL_SOURCES
        return cls(debug_dirs=dirs, sources=sources)


class Session(NamedTuple):
    """One analysed process with the resources the repair needs."""

    proc: Process
    mem: ProcessMemory
    view: TargetView
    root: RootView
    analysis: Analysis

    @property
    def inspection(self) -> Inspection:
        return self.analysis.inspection


def _backend(view: TargetView, arch: str, options: Options):  # type: ignore[no-untyped-def]
    interp = view.interp
    if interp is None:
        raise UnsupportedTarget(f"pid {view.proc.pid}: no dynamic loader mapped", pid=view.proc.pid)
    if interp.symbol(b"_rtld_global") is not None:
        from ldfix.loaders.glibc import GlibcBackend
        return GlibcBackend(view, arch, options.debug_dirs, options.sources)
    if interp.symbol(b"_dl_debug_addr") is not None:
        from ldfix.loaders.musl import MuslBackend
        return MuslBackend(view, arch, options.debug_dirs, options.sources)
    raise UnsupportedTarget(f"pid {view.proc.pid}: unknown dynamic loader "
                            f"{interp.path.decode(errors='backslashreplace')}", pid=view.proc.pid)


def pinned(pid: int) -> Process:
    """The process `pid`, pinned (Process.pin) before anything of it is read:
    sessions opened on it then refuse a process that took its pid since."""
    proc = Process(pid)
    try:
        proc.pin()
    except BaseException:
        proc.close()
        raise
    return proc


@contextmanager
def open_session(pid: int | Process, options: Options | None = None) -> Iterator[Session]:
    """Analyse `pid` (a pinned Process, to keep one identity over several
    sessions; a pid is pinned for this session only)."""
    options = options or Options.from_env()
    owned = not isinstance(pid, Process)
    proc = pinned(pid) if isinstance(pid, int) else pid
    mem = view = root = None
    try:
        if not proc.still_same():
            raise NoSuchProcess(f"pid {proc.pid}: exited during the run", pid=proc.pid)
        check_target(proc)
        arch = arch_name(proc)
        mem = ProcessMemory(proc.pid)
        view = open_target(proc, mem)
        if view.r_debug == 0:
            raise UnsupportedTarget(f"pid {proc.pid}: the loader has not filled DT_DEBUG "
                                    "(not started yet, or not a glibc/musl loader)", pid=proc.pid)
        backend = _backend(view, arch, options)
        root = RootView(proc)
        analysis = backend.analyse(root)
        if not proc.still_same():  # what was read may mix two processes
            raise NoSuchProcess(f"pid {proc.pid}: exited during the run", pid=proc.pid)
        yield Session(proc, mem, view, root, analysis)
    except (LdfixError, ValueError, IndexError, OverflowError, OSError) as exc:
        if isinstance(exc, NoSuchProcess):
            raise
        if not proc.still_same():
            raise NoSuchProcess(f"pid {proc.pid}: exited during the run", pid=proc.pid) from None
        if isinstance(exc, LdfixError):
            raise
        if isinstance(exc, OSError):
            raise from_oserror(exc, proc.pid, "inspect") from None
        # A parser met data it cannot make sense of: the target's lists are corrupt.
        raise CorruptTarget(f"pid {proc.pid}: loader data does not hold together ({exc})",
                            pid=proc.pid) from None
    finally:
        if root is not None:
            root.close()
        if view is not None:
            view.close()
        if mem is not None:
            mem.close()
        if owned:
            proc.close()


def inspect(pid: int, *, debug_dirs: Sequence[str] | None = None,
            sources: Sequence[str] | None = None) -> Inspection:
    """Every loaded object of process `pid`, with stored and current ids and a status.

    `debug_dirs` replaces the debug-file search path ([] disables DWARF);
    `sources` restricts the layout sources ("dwarf", "structure", "table", "probe")."""
    options = None
    if debug_dirs is not None or sources is not None:
        env = Options.from_env()
        options = Options(debug_dirs=tuple(debug_dirs) if debug_dirs is not None else env.debug_dirs,
                          sources=frozenset(sources) & ALL_SOURCES if sources is not None else env.sources)
    delay = 0.001
    proc = pinned(pid)
    try:
        for _ in range(INSPECT_ATTEMPTS):
            with open_session(proc, options) as s:
                ins = s.inspection
            if not ins.busy:
                break
            # Read while a dlopen/dlclose ran: the lists may have looked torn.
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
    finally:
        proc.close()
    return ins
