"""glibc: every link-map namespace, the l_file_id layout, the cross-check.

Only the public prefix of struct link_map (l_addr, l_name, l_ld, l_next,
l_prev, l_real, l_ns) is read before a layout is trusted; private fields are
read only through a GlibcLayout whose sources are named."""

from __future__ import annotations

from ldfix.log import getLogger
import os
import posixpath
import struct
from collections.abc import Callable, Sequence
from typing import NamedTuple

from ldfix import layouts_table as table
from ldfix.identity import RootView
from ldfix.layout import (ALL_SOURCES, GlibcLayout, debug_file_candidates, dwarf_glibc_layout_cached,
                          layout_from_row, probe_scan, structure_scan, with_source)
from ldfix.loaders.base import Analysis, BusyField, busy_reason
from ldfix.loaders.common import Lookups, NAME_LIMIT, IdSlot, classify, phnum_mismatches, read_names  # noqa: F401  (NAME_LIMIT: re-exported)
from ldfix.memory import (WALK_BAD_POINTER, WALK_BUDGET, WALK_CYCLE, WALK_END, WALK_UNREADABLE,
                          Memory, Reachable, read, walk_list)
from ldfix.model import FileId, Inspection, LoadedObject, LoaderInfo, Status
from ldfix.target import TargetView

log = getLogger("ldfix.glibc")

WINDOW = 1216          # bytes read of every link_map: the public prefix and every private field used
MAX_OBJECTS = 16384    # per process, over all namespaces
MAX_NAMESPACES = 16    # DL_NNS
# Above every user-space address (x86_64 with 5-level paging: 2**56; aarch64:
# 2**48, or 2**52), below every kernel one.  Not 2**47: aarch64 maps ld.so,
# and so the link_maps it allocates, at 0xffff........
RT_STATES = {0: "RT_CONSISTENT", 1: "RT_ADD", 2: "RT_DELETE"}


def _u64(raw: bytes, off: int) -> int | None:
    return int.from_bytes(raw[off:off + 8], "little") if off + 8 <= len(raw) else None


class RawMap:
    """One link_map as read from the target, with its public prefix decoded."""

    __slots__ = ("addr", "raw", "ns_position", "l_addr", "l_name", "l_ld", "l_next", "l_prev", "l_real")

    def __init__(self, addr: int, raw: bytes, ns_position: int) -> None:
        self.addr, self.raw, self.ns_position = addr, raw, ns_position
        head = raw[:48].ljust(48, b"\0")
        (self.l_addr, self.l_name, self.l_ld, self.l_next, self.l_prev,
         self.l_real) = struct.unpack_from("<6Q", head)

    def word(self, off: int) -> int:
        v = _u64(self.raw, off)
        return 0 if v is None else v


class NamespaceList(NamedTuple):
    hint: int | None       # namespace id when known from _dl_ns[i]
    r_debug: int | None    # its r_debug (for r_state), when known
    maps: list[RawMap]


def _gather(fields: dict[str, tuple[int, str]]) -> Callable[[bytes], dict[str, int]]:
    """One compiled struct reading scattered little-endian fields: {name: (offset, "Q"|"H")}."""
    order = sorted(fields.items(), key=lambda kv: kv[1][0])
    fmt, pos = "<", 0
    for _name, (off, code) in order:
        if off < pos:
            raise ValueError("overlapping fields")
        fmt += f"{off - pos}x{code}" if off > pos else code
        pos = off + struct.calcsize("<" + code)
    st = struct.Struct(fmt)
    names = [n for n, _ in order]

    def unpack(raw: bytes) -> dict[str, int]:
        return dict(zip(names, st.unpack_from(raw)))
    return unpack


def walk_chain(mem: Memory, head: int, budget: int, position: int,
               read_size: int = WINDOW) -> tuple[list[RawMap], str | None]:
    """Follow l_next from `head`; stops at a cycle, a bad pointer or the budget."""
    nodes, stop, at = walk_list(mem, head, table.L_NEXT, table.L_PREV, read_size, 56, budget)
    maps = [RawMap(addr, raw, position) for addr, raw in nodes]
    if stop == WALK_END:
        return maps, None
    if stop == WALK_BUDGET:
        return maps, f"list longer than {MAX_OBJECTS} objects: truncated"
    if stop == WALK_CYCLE:
        return maps, f"cycle in l_next at 0x{at:x}"
    if stop == WALK_BAD_POINTER:
        return maps, f"l_next points to an impossible address 0x{at:x}"
    if stop == WALK_UNREADABLE:
        return maps, f"link_map at 0x{at:x} is unreadable"
    prev = maps[-1].addr if maps else 0
    got = int.from_bytes(mem.read_many([(at + table.L_PREV, 8)])[0], "little")
    return maps, f"l_prev of link_map 0x{at:x} is 0x{got:x}, not 0x{prev:x}"


def read_r_debug(mem: Memory, addr: int) -> tuple[int, int, int, int]:
    """(r_version, r_map, r_state, r_next) of an r_debug(_extended)."""
    raw = read(mem, addr, 40)
    version, = struct.unpack_from("<i", raw, 0)
    r_map, = struct.unpack_from("<Q", raw, 8)
    state, = struct.unpack_from("<i", raw, 24)
    r_next = 0
    if version >= 2:
        r_next = int.from_bytes(read(mem, addr + 40, 8), "little")
    return version, r_map, state, r_next


def find_namespaces(mem: Memory, r_debug: int, rtld_global: int | None,
                    layout: GlibcLayout | None) -> tuple[list[tuple[int | None, int | None, int]], list[str]]:
    """Heads of every namespace's list: [(namespace hint, r_debug or None, head)]."""
    warnings: list[str] = []
    version, r_map, _state, r_next = read_r_debug(mem, r_debug)
    heads: list[tuple[int | None, int | None, int]] = [(0, r_debug, r_map)]
    if version >= 2:
        seen = {r_debug}
        addr = r_next
        while addr:
            if addr in seen or len(seen) >= MAX_NAMESPACES:
                warnings.append(f"r_next chain loops or is longer than {MAX_NAMESPACES}: cut")
                break
            seen.add(addr)
            _v, head, _s, nxt = read_r_debug(mem, addr)
            if _v < 2:
                nxt = 0
            if head:
                heads.append((None, addr, head))
            addr = nxt
        return heads, warnings
    if rtld_global is None or layout is None or layout.nns is None or layout.ns_size is None:
        warnings.append("r_debug has no r_next and _rtld_global's layout is unknown: "
                        "only the base namespace is listed")
        return heads, warnings
    nns = int.from_bytes(read(mem, rtld_global + layout.nns, 8), "little")
    first = int.from_bytes(read(mem, rtld_global, 8), "little")
    if not (1 <= nns <= MAX_NAMESPACES) or first != r_map:
        warnings.append("_rtld_global does not match r_debug: only the base namespace is listed")
        return heads, warnings
    for i in range(1, nns):
        entry = rtld_global + i * layout.ns_size
        head = int.from_bytes(read(mem, entry, 8), "little")
        if head:
            dbg = entry + layout.ns_debug if layout.ns_debug is not None else None
            heads.append((i, dbg, head))
    return heads, warnings


class GlibcBackend:
    kind = "glibc"

    def __init__(self, view: TargetView, arch: str, debug_dirs: Sequence[str],
                 sources: frozenset[str] = ALL_SOURCES) -> None:
        self.view = view
        self.arch = arch
        self.debug_dirs = list(debug_dirs) if "dwarf" in sources else []
        self.sources = sources
        self._names: dict[int, bytes] = {}
        self.warnings: list[str] = []
        interp = view.interp
        self.version = None
        if interp is not None:
            self.version = interp.banner_version(rb"release version (2\.\d+)")
            if self.version is None:
                name = os.path.basename(interp.path).decode(errors="replace")
                if name.startswith("ld-2.") and name.endswith(".so"):
                    self.version = name[3:-3]
        self.rtld_global = interp.symbol(b"_rtld_global") if interp else None

    # -- layout ---------------------------------------------------------------
    def _dwarf(self, root: RootView) -> tuple[GlibcLayout | None, str]:
        interp = self.view.interp
        if interp is None:
            return None, "no loader file"
        bid = interp.file.build_id()
        if not bid:
            return None, "the loader has no build-id"
        if not self.debug_dirs:
            return None, "debug file search disabled"
        for cand in debug_file_candidates(bid, self.debug_dirs):
            for where, opener in (("target root", root.open_file), ("host", _open_host)):
                fd = opener(cand)
                if fd is None:
                    continue
                try:
                    size = os.fstat(fd).st_size
                    from ldfix.elf import ElfFile
                    try:
                        dbid = ElfFile(fd, size).build_id()
                    except Exception:
                        dbid = None
                    if dbid != bid:
                        log.debug("debug file %s (%s) has another build-id", cand, where)
                        continue
                    lay = dwarf_glibc_layout_cached(fd, bid, _alt_opener(opener, cand))
                    if lay is not None:
                        log.debug("DWARF layout from %s (%s): l_file_id at %d", cand, where, lay.file_id)
                        return lay, f"{cand} ({where})"
                finally:
                    os.close(fd)
        return None, f"no debug file for build-id {bid.hex()}"

    def decide_layout(self, root: RootView, ordinary: list[RawMap],
                      fixed: list[RawMap] | None = None) -> tuple[GlibcLayout | None, str]:
        """`ordinary`: maps with the l_local_scope signature; `fixed`: the maps
        that must hold zeros at the id (program, loader, vdso)."""
        dw, dw_note = self._dwarf(root)
        row = table.glibc_row(self.version, self.arch) if "table" in self.sources else None
        rrow = table.rtld_row(self.version, self.arch) if "table" in self.sources else None
        # With DWARF, the cross-check verifies the l_local_scope signature at
        # DWARF's offset on every map: scanning for it would say nothing more.
        k = structure_scan([(m.addr, m.raw) for m in ordinary]) \
            if dw is None or dw.l_local_scope is None else None
        if dw is not None:
            if k is not None and dw.l_local_scope is not None and k != dw.l_local_scope:
                return None, (f"DWARF ({dw_note}) puts l_local_scope at {dw.l_local_scope} but the "
                              f"target's own maps show it at {k}")
            if dw.nns is None and rrow is not None:
                dw = dw._replace(ns_size=rrow.ns_size, ns_debug=rrow.ns_debug, nns=rrow.nns,
                                 load_lock=rrow.load_lock)
            return with_source(dw, "dwarf"), ""
        reasons = [f"dwarf: {dw_note}"]
        if k is None:
            reasons.append("structure: no l_local_scope signature common to every map")
        if row is None:
            reasons.append(f"table: no row for glibc {self.version or '(version unknown)'} {self.arch}")
        if k is not None and row is not None:
            if row.l_local_scope == k:
                return with_source(layout_from_row(row, rrow), "structure+table"), ""
            reasons.append(f"structure puts l_local_scope at {k}, the table for glibc "
                           f"{self.version} at {row.l_local_scope} (a patched build?)")
        if k is not None and "probe" in self.sources:
            off = self._probe(root, ordinary, fixed or [])
            if off is not None and off == k + 16:
                return GlibcLayout(file_id=off, source="structure+probe", l_local_scope=k), ""
            reasons.append("probe: " + ("no two unchanged libraries hold their file's id at one offset"
                                        if off is None else f"ids found at {off}, structure says {k + 16}"))
        return None, "; ".join(reasons)

    def _probe(self, root: RootView, ordinary: list[RawMap], fixed: list[RawMap]) -> int | None:
        """Stat calibration on the target itself (libraries whose files kept their id)."""
        named = [m for m in ordinary[1:] if self._names.get(m.addr)]  # the program's own id is never set
        probes = root.probe_many([self._names[m.addr] for m in named], None)
        pairs = [(m.raw, p.current.pack()) for m, p in zip(named, probes) if p.current is not None]
        return probe_scan(pairs, [m.raw for m in fixed], 560, WINDOW - 16)

    # -- analysis -------------------------------------------------------------
    def analyse(self, root: RootView) -> Analysis:
        view, mem = self.view, self.view.mem
        pid = view.proc.pid
        info = LoaderInfo("glibc", self.version, self.arch, None,
                          interpreter=view.interp_name.decode(errors="replace") if view.interp_name else None)
        # Namespaces need _rtld_global's layout before 2.35; the table (or
        # DWARF below) gives it.  Only the head pointers are read from it.
        row = table.glibc_row(self.version, self.arch)
        pre = layout_from_row(row, table.rtld_row(self.version, self.arch)) if row else None
        heads, warns = find_namespaces(mem, view.r_debug, self.rtld_global, pre)
        self.warnings += warns
        lists: list[NamespaceList] = []
        partial = any("cut" in w for w in warns)  # namespaces may be missing
        budget = MAX_OBJECTS
        for pos, (hint, dbg, head) in enumerate(heads):
            maps, problem = walk_chain(mem, head, budget, pos)
            budget -= len(maps)
            if problem:
                self.warnings.append(f"namespace list {pos}: {problem}")
                partial = True
            lists.append(NamespaceList(hint, dbg, maps))
        all_maps = [m for lst in lists for m in lst.maps]
        names = self._names = _read_names(mem, all_maps)

        vdso = view.special(b"[vdso]")

        def role(m: RawMap, first: bool) -> str:
            if m.l_real != m.addr:
                return "proxy"
            if first and m.ns_position == 0:
                return "main"
            if vdso and vdso[0] <= m.l_ld < vdso[1]:
                return "vdso"
            if m.l_ld and view.in_interp(m.l_ld):
                return "loader"
            return "library"

        objects: list[LoadedObject] = []
        roles: dict[int, str] = {}
        unnamed: set[int] = set()
        for lst in lists:
            for i, m in enumerate(lst.maps):
                r = role(m, i == 0)
                roles[m.addr] = r
                name = names[m.addr]
                if r == "main" and not name:
                    # glibc records "" for the program; show what pldd shows.
                    exe = view.proc.readlink("exe")
                    name = os.fsencode(exe) if exe else b""
                    unnamed.add(m.addr)
                ns = lst.hint if lst.hint is not None else m.ns_position
                objects.append(LoadedObject(namespace=ns, name=name, role=r, address=m.addr,
                                            base=m.l_addr))
        ordinary = [m for m in all_maps if roles[m.addr] in ("main", "library")]
        fixed = [m for m in all_maps if roles[m.addr] in ("loader", "vdso")]
        layout, why = self.decide_layout(root, ordinary, fixed)
        busy: list[BusyField] = []
        candidate = layout or pre
        by_addr = {m.addr: m for m in all_maps}
        slots: dict[int, IdSlot] = {}
        lookups = None
        if layout is None:
            info.layout_error = why
        else:
            if all(len(m.raw) >= layout.span for m in all_maps):
                slots = self._slots(layout, objects, by_addr)
                # The files are looked up while the layout is cross-checked;
                # the lookups only read (ids, build-ids), and are dropped if
                # it fails.  (A map read short fails the cross-check, which
                # says so: then nothing is looked up.)
                lookups = Lookups(root, objects, slots, unnamed, background=True)
            try:
                problems = self.cross_check(layout, lists, roles)
            finally:
                if lookups is not None:
                    lookups.wait()
            if problems:
                info.layout_error = (f"layout from {layout.source} failed the cross-check on the "
                                     f"target: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
                layout = None
        if layout is not None:
            info.layout_source = layout.source
            # Namespace ids come from l_ns now that the layout is verified.
            for o in objects:
                m = by_addr[o.address]
                o.namespace = m.word(layout.l_ns)
                if layout.l_map_start is not None and layout.l_map_end is not None:
                    o.map_start, o.map_end = m.word(layout.l_map_start), m.word(layout.l_map_end)
                elif m.l_ld:
                    # No l_map_start in this layout: the lowest mapping of the file holding l_ld.
                    o.map_start = view.file_start(m.l_ld)
            classify(mem, root, objects, slots or self._slots(layout, objects, by_addr), unnamed,
                     view.open_mapped, lookups)
            busy = self._busy_fields(layout, lists)
            info.lock_check = "r_state and _dl_load_lock" if any(b.owner_offset is not None for b in busy) \
                else "r_state only"
        else:
            for o in objects:
                o.status, o.reason = Status.UNKNOWN, "id layout not verified"
        inspection = Inspection(pid, info, objects, partial=partial, warnings=self.warnings)
        if layout is None or partial:
            # Unverified or cut lists are expected while a dlopen/dlclose runs
            # (the reads above are not atomic): say so, so callers retry.
            fields = self._busy_fields(candidate, lists) if candidate else \
                [BusyField(lst.r_debug + 24, 4, f"r_state of list {i}") for i, lst in enumerate(lists) if lst.r_debug]
            inspection.busy = busy_reason(mem, fields)
        relink = Reachable(mem, [m.addr for m in all_maps], table.L_NEXT, table.L_PREV, MAX_OBJECTS)
        return Analysis(inspection, busy, members=lambda m: self.members(m, pre, relink))

    @staticmethod
    def _slots(layout: GlibcLayout, objects: list[LoadedObject], by_addr: dict[int, RawMap]) -> dict[int, IdSlot]:
        """Where each object's id lives, and what it holds (maps read whole only)."""
        slots = {}
        for o in objects:
            m = by_addr[o.address]
            removed = layout.l_removed is not None and \
                bool(m.raw[layout.l_removed[0]] >> layout.l_removed[1] & 1)
            slots[o.address] = IdSlot(FileId.unpack(m.raw[layout.file_id:layout.file_id + 16]),
                                      o.address + layout.file_id, removed)
        return slots

    def members(self, mem: Memory, pre: GlibcLayout | None, relink: Reachable) -> set[int]:
        """Addresses of every link_map reachable now (public fields only).

        Runs inside the freeze: the maps found while planning are re-linked
        with one batched read; only what is new is walked node by node."""
        heads, _ = find_namespaces(mem, self.view.r_debug, self.rtld_global, pre)
        return relink([h for _, _, h in heads])

    def cross_check(self, layout: GlibcLayout, lists: list[NamespaceList], roles: dict[int, str]) -> list[str]:
        """Every invariant the verified layout implies, on every map of the target."""
        view = self.view
        problems: list[str] = []
        ns_ids: dict[int, int] = {}
        starts = view.starts()
        headers: list[tuple[int, int, int]] = []   # (map address, l_map_start, l_phnum)
        k = layout.l_local_scope
        fields = {"ns": (layout.l_ns, "Q"), "dev": (layout.file_id, "Q"), "ino": (layout.file_id + 8, "Q")}
        have_range = layout.l_map_start is not None and layout.l_map_end is not None
        if layout.l_map_start is not None and layout.l_map_end is not None:
            fields["start"] = (layout.l_map_start, "Q")
            fields["end"] = (layout.l_map_end, "Q")
        if layout.l_phdr is not None and layout.l_phnum is not None:
            fields["phdr"] = (layout.l_phdr, "Q")
            fields["phnum"] = (layout.l_phnum, "H")
        if k is not None:
            fields["local0"] = (k, "Q")
            fields["scope_max"] = (k - 16, "Q")
        unpack = _gather(fields)
        for pos, lst in enumerate(lists):
            for m in lst.maps:
                where = f"link_map 0x{m.addr:x}"
                if len(m.raw) < layout.span:
                    problems.append(f"{where}: only {len(m.raw)} bytes readable")
                    continue
                f = unpack(m.raw)
                ns = f["ns"]
                if ns >= MAX_NAMESPACES:
                    problems.append(f"{where}: l_ns {ns} out of range")
                if ns_ids.setdefault(pos, ns) != ns:
                    problems.append(f"{where}: l_ns {ns} differs from its list's {ns_ids[pos]}")
                if lst.hint is not None and ns != lst.hint:
                    problems.append(f"{where}: l_ns {ns}, expected {lst.hint}")
                r = roles[m.addr]
                zero_id = f["dev"] == 0 and f["ino"] == 0
                if r in ("loader", "vdso", "proxy", "main"):
                    if r != "main" and not zero_id:
                        problems.append(f"{where} ({r}): stored id is not zero")
                    if r == "proxy":
                        continue
                if have_range and r != "loader":
                    start, end = f["start"], f["end"]
                    if not (start < end) or start not in starts:
                        problems.append(f"{where}: l_map_start 0x{start:x} is not the start of a mapping")
                        continue
                    if m.l_ld and not (start <= m.l_ld < end):
                        problems.append(f"{where}: l_ld outside [l_map_start, l_map_end)")
                    if "phdr" in f:
                        if not (start <= f["phdr"] < end):
                            problems.append(f"{where}: l_phdr outside the object")
                        headers.append((m.addr, start, f["phnum"]))
                if r == "library" and zero_id:
                    problems.append(f"{where}: a library with no stored id")
                if r in ("main", "library") and k is not None:
                    if not (m.addr < f["local0"] < m.addr + k) or f["scope_max"] < 4:
                        problems.append(f"{where}: l_local_scope signature does not hold")
        if len(set(ns_ids.values())) != len(ns_ids):
            problems.append("two lists claim the same namespace")
        problems += phnum_mismatches(view.mem, [(f"link_map 0x{a:x}", s, n) for a, s, n in headers])
        return problems

    def _busy_fields(self, layout: GlibcLayout, lists: list[NamespaceList]) -> list[BusyField]:
        out = []
        for lst in lists:
            if lst.r_debug is not None:
                out.append(BusyField(lst.r_debug + 24, 4, f"r_state of list {lists.index(lst)}"))
        if self.rtld_global is not None and layout.load_lock is not None:
            out.append(BusyField(self.rtld_global + layout.load_lock, 4, "_dl_load_lock", owner_offset=8))
        return out


def _alt_opener(opener: Callable[[str], int | None], debug_path: str) -> Callable[[str], int | None]:
    """Opens a dwz supplementary file where its debug file was found (the same
    root); a relative name is relative to the debug file's directory."""
    def open_alt(name: str) -> int | None:
        return opener(posixpath.normpath(posixpath.join(posixpath.dirname(debug_path), name)))
    return open_alt


def _open_host(path: str) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    return fd


def _read_names(mem: Memory, maps: list[RawMap]) -> dict[int, bytes]:
    """l_name of every map (see common.read_names)."""
    return read_names(mem, [(m.addr, m.l_name) for m in maps])
