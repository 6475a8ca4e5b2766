"""The in-process preload agent (csrc/agent.c): where it is installed, and the
repair of the calling process from Python.

    LD_PRELOAD=$(ldfix agent-path) my-program            # glibc programs
    LD_PRELOAD=$(dirname $(ldfix agent-path))/libldfix_agent_musl.so prog   # musl

The agent calibrates itself at load time, checks on every dlopen()/dlmopen()
whether the process was restored (one stat() of its own file) and then
repairs every stale id itself, with the rules of `ldfix fix`.  A program (or
a Python process) that knows it was just restored can ask for the repair at
once: `repair_in_process()`, or `ldfix_repair()` from C."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import NamedTuple

from ldfix.errors import LdfixError

KINDS = {"glibc": "libldfix_agent.so", "musl": "libldfix_agent_musl.so"}
_DIR = Path(__file__).resolve().parent / "_agent"


def agent_path(kind: str = "glibc") -> str:
    """Absolute path of the installed agent for programs linked against `kind`
    ("glibc" or "musl").  Raises LdfixError if it was not built (the musl agent
    needs musl-gcc at install time)."""
    try:
        name = KINDS[kind]
    except KeyError:
        raise LdfixError(f"unknown agent kind {kind!r} (one of: {', '.join(KINDS)})") from None
    path = _DIR / name
    if not path.is_file():
        why = " (musl-gcc was not found when ldfix was installed: install musl-tools and reinstall)" \
            if kind == "musl" else ""
        raise LdfixError(f"the {kind} preload agent is not installed at {path}{why}")
    return str(path)


def loaded_agent() -> str | None:
    """Path of the agent mapped into this process, if any (from /proc/self/maps)."""
    names = set(KINDS.values())
    try:
        with open("/proc/self/maps", "rb") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6:
                    path = parts[5].rstrip(b"\n").decode(errors="surrogateescape")
                    if os.path.basename(path) in names:
                        return path
    except OSError:
        return None
    return None


def _agent_function(name: str, restype: type) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """A function of the agent loaded in this process, or None.

    Looked up first in the global scope through ctypes' handle of the program
    (opened when ctypes was imported): a preloaded agent is there, and no
    dlopen() is made (each dlopen() runs the agent's restore check, which
    would repair before we ask).  Else a handle to the copy already mapped
    (RTLD_NOLOAD), for an agent loaded RTLD_LOCAL."""
    proto = ctypes.CFUNCTYPE(restype)
    try:
        addr = ctypes.cast(getattr(ctypes.pythonapi, name), ctypes.c_void_p).value
        if addr:
            return proto(addr)
    except AttributeError:
        pass
    path = loaded_agent()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)
        fn = getattr(lib, name)
    except (OSError, AttributeError):
        return None
    fn.restype = restype
    fn.argtypes = []
    return fn


def status() -> str | None:
    """The loaded agent's one-line state ("active: ..." / "inert: why"), or None
    if no agent is loaded in this process."""
    fn = _agent_function("ldfix_agent_status", ctypes.c_char_p)
    if fn is None:
        return None
    raw = fn()
    return raw.decode(errors="replace") if raw else ""


class InProcessRepair(NamedTuple):
    """What repair_in_process() did: `method` is "agent" (ldfix_repair() of
    the preloaded agent) or "ldfix" (ldfix.fix on this process); `rewritten`
    counts the ids written; `report` is the FixReport for "ldfix"."""

    method: str
    rewritten: int
    report: object | None = None


AGENT_INERT = -1
AGENT_BUSY = -2


def repair_in_process() -> InProcessRepair:
    """Repair this process's stale ids now.

    With the agent loaded (and active) this calls its ldfix_repair(): no
    ptrace, no privileges.  Otherwise (no agent, or an inert one) it runs
    ldfix.fix(os.getpid()), which needs /proc/self/mem access and the
    package's native module.  Raises LdfixError when nothing could be done
    (the agent saw the loader busy throughout, or ldfix.fix failed).

    `rewritten` counts what this call wrote: an active agent repairs by
    itself at the first dlopen() after a restore (importing a module with a C
    extension is one), and then finds nothing left to do here."""
    fn = _agent_function("ldfix_repair", ctypes.c_int)
    if fn is not None:
        n = fn()
        if n >= 0:
            return InProcessRepair("agent", n)
        if n == AGENT_BUSY:
            from ldfix.errors import LoaderBusy
            raise LoaderBusy("the preloaded agent found the loader busy (a dlopen in flight) "
                             "throughout its wait: nothing written", pid=os.getpid())
    from ldfix.repair import fix

    rep = fix(os.getpid())
    return InProcessRepair("ldfix", len(rep.rewritten), rep)


__all__ = ["KINDS", "InProcessRepair", "agent_path", "loaded_agent", "repair_in_process", "status"]
