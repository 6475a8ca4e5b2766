"""What glibc and musl share once a layout is verified: judging each object."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import NamedTuple

from ldfix.identity import FileFacts, FileProblem, Probe, RootView, image_facts, same_content
from ldfix.memory import Memory, image_build_ids
from ldfix.model import FileId, LoadedObject, Status


class IdSlot(NamedTuple):
    stored: FileId
    address: int           # where the 16 bytes (dev, ino) live in the target
    removed: bool = False  # glibc l_removed: never written


class Lookups:
    """The files of the objects worth looking up, looked up in one native
    call; started in a thread when asked to, so that the kernel's path walks
    overlap the layout's cross-check (cffi releases the GIL)."""

    def __init__(self, root: RootView, objects: list[LoadedObject], slots: dict[int, IdSlot],
                 unnamed: set[int], background: bool = False) -> None:
        self.looked = [o for o in objects if o.role != "vdso" and not o.name.endswith(TRUNCATED)
                       and o.address not in unnamed]
        self._names = [o.name for o in self.looked]
        self._stored = [slots[o.address].stored for o in self.looked]
        self._root = root
        self._probes: list[Probe] | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if background and self.looked:
            self._thread = threading.Thread(target=self._run, name="ldfix-lookups", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._probes = self._root.probe_many(self._names, self._stored)
        except BaseException as exc:  # noqa: BLE001 - re-raised by result()
            self._error = exc

    def result(self) -> list[Probe]:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        elif self._probes is None and self._error is None:
            self._run()
        if self._error is not None:
            raise self._error
        return self._probes or []

    def wait(self) -> None:
        """Let a background lookup end (its result unused)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def classify(mem: Memory, root: RootView, objects: list[LoadedObject],
             slots: dict[int, IdSlot], unnamed: set[int],
             open_mapped: Callable[[int], int | None] | None = None,
             lookups: Lookups | None = None) -> None:
    """Set stored/current/status/reason/writable of every object.

    `slots` maps an object's address to its id slot; `unnamed` holds objects
    whose recorded name is not a path to resolve (glibc's program map);
    `open_mapped(address)` opens the file mapped there, if it can;
    `lookups`, when given, were started earlier with these slots.

    Every file is looked up in one native call; only a file whose id is not
    the stored one is opened (its build-id read).  Where both the file and
    the mapped image have a build-id, they decide; otherwise (no build-id,
    unusual headers) identity.same_content does, in Python."""
    lookups = lookups or Lookups(root, objects, slots, unnamed)
    problems: dict[int, str] = {}
    for o in objects:
        slot = slots[o.address]
        o.stored, o.id_address = slot.stored, slot.address
        if o.role != "vdso" and o.name.endswith(TRUNCATED):
            problems[o.address] = "the recorded name is unreadable or too long"
    build_ids: dict[int, bytes | None] = {}
    for o, p in zip(lookups.looked, lookups.result(), strict=True):
        o.current = p.current
        if p.current is None:
            problems[o.address] = p.problem
        build_ids[o.address] = p.build_id
    pending: list[LoadedObject] = []
    for o in objects:
        slot = slots[o.address]
        if o.role == "vdso":
            o.status, o.reason, o.stored, o.id_address = Status.VIRTUAL, "no file behind it (vdso)", None, None
        elif slot.stored.is_zero:
            o.status, o.reason = Status.UNSET, f"the loader stored no id ({o.role})"
        elif slot.removed:
            o.status, o.reason = Status.UNSET, "being removed (l_removed)"
        elif o.current is None:
            o.status, o.reason = Status.MISSING, problems.get(o.address, "")
        elif o.current == slot.stored:
            o.status, o.reason = Status.OK, "stored id equals the file's"
        else:
            pending.append(o)
    if not pending:
        return
    mapped = image_build_ids(mem, [(o.base, o.map_start or 0) for o in pending])
    slow: list[LoadedObject] = []
    for o, img_bid in zip(pending, mapped):
        file_bid = build_ids.get(o.address)
        if img_bid is None or file_bid is None:
            slow.append(o)
        elif img_bid == file_bid:
            o.status, o.reason, o.writable = Status.STALE, "new id, same build-id", o.role == "library"
        else:
            o.status, o.reason = Status.CHANGED, "build-id differs"
    if slow:
        _classify_slowly(mem, root, slow, slots, open_mapped)


def _classify_slowly(mem: Memory, root: RootView, objects: list[LoadedObject],
                     slots: dict[int, IdSlot], open_mapped: Callable[[int], int | None] | None) -> None:
    """The whole comparison (identity.same_content) for objects the fast path
    could not decide; the file is looked at again, and its id then is the one
    judged."""
    pending: list[tuple[LoadedObject, FileFacts]] = []
    for o in objects:
        try:
            facts = root.facts(o.name)
        except FileProblem as exc:
            o.current, o.status, o.reason = None, Status.MISSING, exc.reason
            continue
        o.current = facts.id
        if facts.id == slots[o.address].stored:
            o.status, o.reason = Status.OK, "stored id equals the file's"
        else:
            pending.append((o, facts))
    imgs = image_facts(mem, [(o.base, o.map_start or 0) for o, _ in pending])
    for (o, facts), img in zip(pending, imgs):
        same, how = same_content(img, facts, _comparer(root, o, facts, open_mapped))
        if same:
            o.status, o.reason, o.writable = Status.STALE, f"new id, {how}", o.role == "library"
        else:
            o.status, o.reason = Status.CHANGED, how


def _comparer(root: RootView, o: LoadedObject, facts: FileFacts,
              open_mapped: Callable[[int], int | None] | None) -> Callable[[], tuple[bool | None, str]]:
    """Byte-compares the file mapped at the object's start with its current
    file (only asked for when neither has a build-id)."""
    def compare() -> tuple[bool | None, str]:
        fd = open_mapped(o.map_start) if open_mapped and o.map_start else None
        if fd is None:
            return None, "no build-id, and the mapped file cannot be opened to compare its bytes"
        try:
            return root.same_bytes(o.name, facts.id, fd)
        finally:
            os.close(fd)
    return compare


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
