"""musl: the dso list, the dev/ino layout, the cross-check.

musl writes the address of its `struct debug` (r_debug's first five fields)
into the program's DT_DEBUG; `head` is the program's struct dso, `next`
(+24) chains every loaded object: the program, its libraries, the loader
(libc.so itself) and the vdso.  `dev` and `ino` (64-bit on every musl arch)
are set only for libraries musl mapped itself; the program, the loader and
the vdso keep 0/0.  There are no namespaces (reported as namespace 0)."""

from __future__ import annotations

from ldfix.log import getLogger
import os
import re
import struct
from collections.abc import Sequence
from typing import NamedTuple

from ldfix.identity import RootView
from ldfix.layout import ALL_SOURCES, probe_scan
from ldfix.loaders.base import Analysis, BusyField
from ldfix.loaders.common import IdSlot, classify, phnum_mismatches, read_names
from ldfix.memory import (WALK_BAD_POINTER, WALK_BUDGET, WALK_CYCLE, WALK_END, WALK_UNREADABLE, Memory,
                          Reachable, read, walk_list)
from ldfix.model import FileId, Inspection, LoadedObject, LoaderInfo, Status
from ldfix.target import TargetView

log = getLogger("ldfix.musl")

# struct dso, identical in musl 1.1.24 .. 1.2.5 (reference/loader-layouts.md, T5).
BASE, NAME, DYNV, NEXT, PREV, PHDR, PHNUM = 0, 8, 16, 24, 32, 40, 48
TABLE_MAP, TABLE_DEV = 136, 152     # map, map_len, dev, ino are consecutive
WINDOW = 368                        # sizeof(struct dso) without buf[]
MAX_OBJECTS = 16384
NAME_LIMIT = 4096
TABLE_VERSIONS = "1.1.24-1.2.5"


def _w(raw: bytes, off: int) -> int:
    return int.from_bytes(raw[off:off + 8], "little") if off + 8 <= len(raw) else 0


class Dso(NamedTuple):
    addr: int
    raw: bytes


def walk(mem: Memory, head: int, read_size: int = WINDOW) -> tuple[list[Dso], str | None]:
    nodes, stop, at = walk_list(mem, head, NEXT, PREV, read_size, 56, MAX_OBJECTS)
    out = [Dso(addr, raw) for addr, raw in nodes]
    problem = {WALK_END: None,
               WALK_BUDGET: f"list longer than {MAX_OBJECTS} objects: truncated",
               WALK_CYCLE: f"cycle in the dso list at 0x{at:x}",
               WALK_BAD_POINTER: f"next points to an impossible address 0x{at:x}",
               WALK_UNREADABLE: f"dso at 0x{at:x} is unreadable"}.get(stop, f"prev of dso 0x{at:x} does not point back")
    return out, problem


def structure_map_offset(dsos: Sequence[Dso], starts: dict[int, int]) -> int | None:
    """Offset of `map` found from the target: the one word that holds, in every
    library dso, the start of the object's lowest mapping (`starts`: dso
    address -> that start), followed by a plausible map_len."""
    cands: set[int] | None = None
    for d in dsos:
        start = starts.get(d.addr)
        if not start:
            return None
        here = {k for k in range(64, min(len(d.raw), 320) - 15, 8)
                if _w(d.raw, k) == start and 0 < _w(d.raw, k + 8) < 1 << 40}
        cands = here if cands is None else cands & here
        if not cands:
            return None
    return cands.pop() if cands and len(cands) == 1 else None


class MuslBackend:
    kind = "musl"
    sources: frozenset[str] = ALL_SOURCES

    def __init__(self, view: TargetView, arch: str, debug_dirs: Sequence[str],
                 sources: frozenset[str] = ALL_SOURCES) -> None:
        self.sources = sources
        self.view = view
        self.arch = arch
        self.warnings: list[str] = []
        self.version, self.version_how = self._version()

    def _version(self) -> tuple[str | None, str]:
        """musl has no version symbol; its libc.so holds the release as a lone
        string ("1.2.3") in .rodata, which `ld-musl --version` prints.  Taken
        only when exactly one such string exists; otherwise unknown."""
        interp = self.view.interp
        if interp is None:
            return None, "no loader file"
        size = min(interp.file.size, 8 << 20)
        data = os.pread(interp.fd, size, 0)
        found = set(re.findall(rb"\0(1\.[12]\.\d{1,2})\0", data))
        if len(found) == 1:
            return found.pop().decode(), "the release string in the loader's .rodata"
        return None, "no unique release string in the loader"

    def analyse(self, root: RootView) -> Analysis:
        view, mem = self.view, self.view.mem
        pid = view.proc.pid
        info = LoaderInfo("musl", self.version, self.arch, None,
                          interpreter=view.interp_name.decode(errors="replace") if view.interp_name else None)
        dbg = read(mem, view.r_debug, 40)
        ver, = struct.unpack_from("<i", dbg, 0)
        head = _w(dbg, 8)
        if ver != 1:
            self.warnings.append(f"musl debug structure has version {ver}, expected 1")
        dsos, problem = walk(mem, head)
        partial = problem is not None
        if problem:
            self.warnings.append(problem)
        names = self._names(dsos)
        vdso = view.special(b"[vdso]")
        objects: list[LoadedObject] = []
        for i, d in enumerate(dsos):
            dyn = _w(d.raw, DYNV)
            if i == 0:
                role = "main"
            elif vdso and vdso[0] <= dyn < vdso[1]:
                role = "vdso"
            elif dyn and view.in_interp(dyn):
                role = "loader"
            else:
                role = "library"
            objects.append(LoadedObject(0, names[d.addr], role, d.addr, _w(d.raw, BASE)))
        by_addr = {d.addr: d for d in dsos}
        libs = [d for d, o in zip(dsos, objects) if o.role == "library"]
        starts: dict[int, int] = {}
        for d in libs:
            dyn = _w(d.raw, DYNV)
            start = view.file_start(dyn) if dyn else None
            if start is not None:
                starts[d.addr] = start
        k = structure_map_offset(libs, starts) if libs else None
        layout_dev: int | None = None
        if not libs:
            # Nothing musl would ever compare or write: only zero ids exist.
            layout_dev, info.layout_source = TABLE_DEV, "table (no library to verify)"
        elif k == TABLE_MAP and "table" in self.sources:
            layout_dev, info.layout_source = TABLE_DEV, "structure+table"
        else:
            why = (f"structure: `map` found at {k}, the table ({TABLE_VERSIONS}) says {TABLE_MAP}"
                   if k is not None and "table" in self.sources else
                   "structure: no `map` offset common to every library" if k is None else "table not used")
            # dev and ino follow map and map_len: a stat calibration on the
            # libraries whose files kept their id must find dev right there.
            off = None
            if k is not None and "probe" in self.sources:
                libs = [o for o in objects if o.role == "library" and o.name]
                probes = root.probe_many([o.name for o in libs], None)
                pairs = [(by_addr[o.address].raw, p.current.pack())
                         for o, p in zip(libs, probes) if p.current is not None]
                fixed = [by_addr[o.address].raw for o in objects if o.role in ("main", "loader", "vdso")]
                off = probe_scan(pairs, fixed, 64, WINDOW - 16)
            if off is not None and k is not None and off == k + 16:
                layout_dev, info.layout_source = off, "structure+probe"
            else:
                info.layout_error = why + ("; probe: no two unchanged libraries hold their file's id "
                                           "at one offset" if off is None else f"; probe: ids at {off}")
        if layout_dev is not None:
            problems = self._cross_check(objects, by_addr, layout_dev)
            if problems:
                info.layout_error = (f"layout from {info.layout_source} failed the cross-check on the "
                                     f"target: {problems[0]}")
                info.layout_source, layout_dev = None, None
        busy: list[BusyField] = []
        if layout_dev is not None:
            slots = {}
            for o in objects:
                raw = by_addr[o.address].raw
                o.map_start = _w(raw, TABLE_MAP) or None
                o.map_end = (o.map_start + _w(raw, TABLE_MAP + 8)) if o.map_start else None
                slots[o.address] = IdSlot(FileId.unpack(raw[layout_dev:layout_dev + 16]), o.address + layout_dev)
            classify(mem, root, objects, slots, set(), view.open_mapped)
            busy = [BusyField(view.r_debug + 24, 4, "musl debug.state")]
            info.lock_check = "debug.state"
        else:
            for o in objects:
                o.status, o.reason = Status.UNKNOWN, "id layout not verified"
        if self.version is None:
            self.warnings.append(f"musl version unknown ({self.version_how})")
        inspection = Inspection(pid, info, objects, partial=partial, warnings=self.warnings)
        relink = Reachable(mem, [d.addr for d in dsos], NEXT, PREV, MAX_OBJECTS)
        return Analysis(inspection, busy, members=lambda m: self.members(m, relink))

    def members(self, mem: Memory, relink: Reachable) -> set[int]:
        """Every dso reachable now (see glibc's members: one batched read)."""
        return relink([_w(read(mem, self.view.r_debug, 16), 8)])

    def _names(self, dsos: list[Dso]) -> dict[int, bytes]:
        return read_names(self.view.mem, [(d.addr, _w(d.raw, NAME)) for d in dsos])

    def _cross_check(self, objects: list[LoadedObject], by_addr: dict[int, Dso], dev_off: int) -> list[str]:
        view = self.view
        starts = view.starts()
        problems = []
        heads = []
        for o in objects:
            raw = by_addr[o.address].raw
            where = f"dso 0x{o.address:x} ({o.role})"
            if len(raw) < dev_off + 16:
                problems.append(f"{where}: only {len(raw)} bytes readable")
                continue
            stored = FileId.unpack(raw[dev_off:dev_off + 16])
            mstart, mlen = _w(raw, TABLE_MAP), _w(raw, TABLE_MAP + 8)
            dyn, phdr = _w(raw, DYNV), _w(raw, PHDR)
            if o.role == "library":
                if stored.is_zero:
                    problems.append(f"{where}: a library with no stored id")
                if mstart not in starts or not (mstart <= dyn < mstart + mlen) \
                        or not (mstart <= phdr < mstart + mlen):
                    problems.append(f"{where}: map/map_len do not cover dynv and phdr")
                    continue
                heads.append((o, mstart, int.from_bytes(raw[PHNUM:PHNUM + 2], "little")))
            elif not stored.is_zero:
                problems.append(f"{where}: stored id is not zero")
        problems += phnum_mismatches(view.mem, [(f"dso 0x{o.address:x}", s, n) for o, s, n in heads])
        return problems
