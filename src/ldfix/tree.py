"""Which processes a run covers: given pids, optionally their descendants,
one entry per address space (threads and CLONE_VM siblings share one)."""

from __future__ import annotations

import os

from ldfix import native

MAX_PROCESSES = 65536


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except FileNotFoundError:
            return _children_psutil(pid)
        except OSError:
            continue
    return out


def _children_psutil(pid: int) -> list[int]:
    import psutil  # only where /proc/PID/task/TID/children is missing

    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def descendants(pid: int) -> list[int]:
    """pid and all its descendants, parents before children."""
    out: list[int] = []
    seen: set[int] = set()
    queue = [pid]
    while queue and len(out) < MAX_PROCESSES:
        p = queue.pop(0)
        if p in seen:
            continue
        seen.add(p)
        out.append(p)
        queue.extend(_children(p))
    return out


def tgid_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return pid


def address_spaces(pids: list[int]) -> tuple[list[int], dict[int, int]]:
    """(one pid per address space, {dropped pid: the pid that covers it})."""
    chosen: list[int] = []
    covered: dict[int, int] = {}
    by_exe: dict[str | None, list[int]] = {}
    for pid in pids:
        tg = tgid_of(pid)
        if tg != pid and tg in chosen:
            covered[pid] = tg
            continue
        pid = tg
        if pid in chosen:
            continue
        try:
            exe: str | None = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            exe = None
        same = None
        # Without an executable there is no address space to share (zombies,
        # kernel threads): kcmp would call two empty ones equal.
        for other in by_exe.get(exe, []) if exe is not None else []:
            try:
                if native.kcmp_vm(pid, other):
                    same = other
                    break
            except OSError:
                continue
        if same is not None:
            covered[pid] = same
            continue
        by_exe.setdefault(exe, []).append(pid)
        chosen.append(pid)
    return chosen, covered
