"""What glibc and musl share once a layout is verified: judging each object."""

from __future__ import annotations

from typing import NamedTuple

from ldfix.identity import FileFacts, FileProblem, RootView, image_facts, same_content
from ldfix.memory import Memory
from ldfix.model import FileId, LoadedObject, Status


class IdSlot(NamedTuple):
    stored: FileId
    address: int           # where the 16 bytes (dev, ino) live in the target
    removed: bool = False  # glibc l_removed: never written


def classify(mem: Memory, root: RootView, objects: list[LoadedObject],
             slots: dict[int, IdSlot], unnamed: set[int]) -> None:
    """Set stored/current/status/reason/writable of every object.

    `slots` maps an object's address to its id slot; `unnamed` holds objects
    whose recorded name is not a path to resolve (glibc's program map)."""
    pending: list[tuple[LoadedObject, FileFacts]] = []
    for o in objects:
        slot = slots[o.address]
        o.stored, o.id_address = slot.stored, slot.address
        if o.role == "vdso":
            o.status, o.reason, o.stored, o.id_address = Status.VIRTUAL, "no file behind it (vdso)", None, None
            continue
        problem = ""
        facts: FileFacts | None = None
        if o.name.endswith(TRUNCATED):
            problem = "the recorded name is unreadable or too long"
        elif o.address not in unnamed:
            try:
                # Only a file with a new id is opened and read (ELF headers, build-id).
                o.current, facts = root.probe(o.name, slot.stored)
            except FileProblem as exc:
                o.current, problem = None, exc.reason
        if slot.stored.is_zero:
            o.status, o.reason = Status.UNSET, f"the loader stored no id ({o.role})"
        elif slot.removed:
            o.status, o.reason = Status.UNSET, "being removed (l_removed)"
        elif o.current is None:
            o.status, o.reason = Status.MISSING, problem
        elif o.current == slot.stored or facts is None:
            o.status, o.reason = Status.OK, "stored id equals the file's"
        else:
            pending.append((o, facts))
    if not pending:
        return
    imgs = image_facts(mem, [(o.base, o.map_start or 0) for o, _ in pending])
    for (o, facts), img in zip(pending, imgs):
        same, how = same_content(img, facts)
        if same:
            o.status, o.reason, o.writable = Status.STALE, f"new id, {how}", o.role == "library"
        else:
            o.status, o.reason = Status.CHANGED, how


def phnum_mismatches(mem: Memory, items: list[tuple[str, int, int]]) -> list[str]:
    """For each (label, start of the mapped image, program header count the
    loader recorded): a problem unless an ELF header with that e_phnum is
    mapped there.  One batched read."""
    problems = []
    raws = mem.read_many([(start, 64) for _, start, _ in items])
    for (label, _start, phnum), raw in zip(items, raws):
        if len(raw) < 64 or raw[:4] != b"\x7fELF" or int.from_bytes(raw[56:58], "little") != phnum:
            problems.append(f"{label}: the program header count does not match the mapped ELF header")
    return problems


NAME_LIMIT = 4096
NAME_FIRST = 256
TRUNCATED = b"...(truncated)"  # marks a name that was not read whole: never resolved


def read_names(mem: Memory, pointers: list[tuple[int, int]]) -> dict[int, bytes]:
    """Recorded names: {object address: bytes} for [(object address, name pointer)].

    One batched read of the first 256 bytes of every name, then page-wise reads
    for the few longer ones, bounded by NAME_LIMIT (a longer name is cut and
    marked, so it can never resolve to a file)."""
    from ldfix.errors import LdfixError
    from ldfix.memory import read_cstring

    out: dict[int, bytes] = {}
    first = mem.read_many([(p, NAME_FIRST) if p > 0 else (0, 0) for _, p in pointers])
    for (addr, p), raw in zip(pointers, first):
        if p <= 0:
            out[addr] = b""
            continue
        nul = raw.find(b"\0")
        if nul >= 0:
            out[addr] = raw[:nul]
            continue
        try:
            name, complete = read_cstring(mem, p, NAME_LIMIT)
        except LdfixError:
            name, complete = raw, False
        out[addr] = name if complete else name[:NAME_LIMIT] + TRUNCATED
    return out
