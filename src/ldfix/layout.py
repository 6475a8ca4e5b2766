"""Where a loader keeps its private fields, and how sure we are.

Sources (../shared/DESIGN.md, "Finding the layout"):
  dwarf      the debug file of the target's own ld.so build, found by build-id
  structure  the l_local_scope signature read from the target's own link_maps
  table      known layouts per glibc version (layouts_table.py): a prior
  probe      stat calibration on a process whose ids are fresh
A layout is trusted for writing when an exact source (dwarf) applies or two
independent sources agree; every report names the sources that decided."""

from __future__ import annotations


from ldfix.log import getLogger
import os
import struct
from collections.abc import Callable, Sequence
from typing import NamedTuple

from ldfix import layouts_table as table
from ldfix.errors import CorruptTarget, LdfixError

log = getLogger("ldfix.layout")

DEFAULT_DEBUG_DIRS = ("/usr/lib/debug",)


class GlibcLayout(NamedTuple):
    """Offsets in struct link_map (and struct rtld_global) for one ld.so build."""

    file_id: int
    source: str
    l_real: int = table.L_REAL
    l_ns: int = table.L_NS
    l_phdr: int | None = None
    l_phnum: int | None = None
    l_map_start: int | None = None
    l_map_end: int | None = None
    l_type: tuple[int, int] | None = None
    l_removed: tuple[int, int] | None = None
    l_local_scope: int | None = None
    # struct rtld_global
    ns_size: int | None = None
    ns_debug: int | None = None
    nns: int | None = None
    load_lock: int | None = None

    @property
    def span(self) -> int:
        """Bytes of a link_map that must be read to see every field used."""
        return self.file_id + 16


def layout_from_row(row: table.GlibcRow, rtld: table.RtldRow | None) -> GlibcLayout:
    return GlibcLayout(
        file_id=row.file_id, source="table", l_phdr=row.l_phdr, l_phnum=row.l_phnum,
        l_map_start=row.l_map_start, l_map_end=row.l_map_end, l_type=row.l_type,
        l_removed=row.l_removed, l_local_scope=row.l_local_scope,
        ns_size=rtld.ns_size if rtld else None, ns_debug=rtld.ns_debug if rtld else None,
        nns=rtld.nns if rtld else None, load_lock=rtld.load_lock if rtld else None)


# --- DWARF -------------------------------------------------------------------

def debug_file_candidates(build_id: bytes, debug_dirs: Sequence[str]) -> list[str]:
    hexid = build_id.hex()
    return [f"{d.rstrip('/')}/.build-id/{hexid[:2]}/{hexid[2:]}.debug" for d in debug_dirs]


def _member_offsets(die: object) -> dict[str, int | tuple[int, int]]:
    out: dict[str, int | tuple[int, int]] = {}
    for child in die.iter_children():  # type: ignore[attr-defined]
        if child.tag != "DW_TAG_member" or "DW_AT_name" not in child.attributes:
            continue
        raw_name = child.attributes["DW_AT_name"].value
        if not isinstance(raw_name, bytes):  # a name in a dwz supplementary file
            continue
        name = raw_name.decode("ascii", "replace")
        attrs = child.attributes
        if "DW_AT_data_bit_offset" in attrs:
            bit = attrs["DW_AT_data_bit_offset"].value
            out[name] = (bit // 8, bit % 8)
        elif "DW_AT_data_member_location" in attrs:
            loc = attrs["DW_AT_data_member_location"].value
            if not isinstance(loc, int):
                continue
            if "DW_AT_bit_offset" in attrs and "DW_AT_byte_size" in attrs:
                # DWARF 2/3 bitfields: offset counted from the storage unit's MSB.
                size = attrs["DW_AT_byte_size"].value
                width = attrs["DW_AT_bit_size"].value
                bit = loc * 8 + size * 8 - attrs["DW_AT_bit_offset"].value - width
                out[name] = (bit // 8, bit % 8)
            else:
                out[name] = loc
    return out


MAX_DEBUG_FILE = 256 << 20     # bytes of a debug file ldfix agrees to parse
MAX_DEBUG_SECTION = 64 << 20   # bytes any DWARF section may inflate to


def debug_file_bounded(fd: int) -> str | None:
    """Why a debug file must not be parsed (too big, or a compressed section
    that would inflate past MAX_DEBUG_SECTION), or None.  Debug files may
    come from an untrusted container's root: a small file can hold a
    decompression bomb, and pyelftools inflates sections whole."""
    from ldfix.elf import ElfFile

    try:
        size = os.fstat(fd).st_size
        if size > MAX_DEBUG_FILE:
            return f"debug file of {size} bytes"
        f = ElfFile(fd, size)
        secs = f.sections()
        if not secs:
            return "no section headers"
        shstr = secs[f.ehdr.e_shstrndx] if f.ehdr.e_shstrndx < len(secs) else None
        names = f.pread(shstr[3], min(shstr[4], 1 << 20)) if shstr else b""
        raw = f.pread(f.ehdr.e_shoff, f.ehdr.e_shnum * 64)
        for i, (name_off, _stype, _addr, off, sec_size, _link) in enumerate(secs):
            flags = struct.unpack_from("<Q", raw, i * 64 + 8)[0]
            name = names[name_off:names.find(b"\0", name_off)] if name_off < len(names) else b""
            inflated = sec_size
            if flags & 0x800:  # SHF_COMPRESSED: an Elf64_Chdr gives the inflated size
                inflated = struct.unpack_from("<Q", f.pread(off, 24), 8)[0]
            elif name.startswith(b".zdebug"):  # GNU style: "ZLIB" + 8-byte big-endian size
                head = f.pread(off, 12)
                inflated = int.from_bytes(head[4:12], "big") if head[:4] == b"ZLIB" else 1 << 62
            if name.startswith((b".debug", b".zdebug")) and inflated > MAX_DEBUG_SECTION:
                return f"section {name.decode(errors='replace')} inflates to {inflated} bytes"
    except (LdfixError, OSError, struct.error, IndexError, ValueError) as exc:
        return f"unreadable ({exc})"
    return None


# Opens the file a debug file's .gnu_debugaltlink names (dwz), given that
# name; the caller resolves it where the debug file was found.
AltOpener = Callable[[str], "int | None"]

WANTED_STRUCTS = (b"link_map", b"rtld_global", b"link_namespaces")


def dwarf_glibc_layout(fd: int, alt: AltOpener | None = None) -> GlibcLayout | None:
    """Member offsets of struct link_map / rtld_global from a debug file.

    A debug file processed by dwz may keep these structures in its
    supplementary file (.gnu_debugaltlink): `alt` opens it, and it is used
    only when its build-id is the one the link names.  Any failure to parse
    means "no DWARF": the files may be hostile."""
    why = debug_file_bounded(fd)
    if why:
        log.debug("DWARF: debug file refused: %s", why)
        return None
    try:
        found = _dwarf_structs(fd)
        if alt is not None and not all(k in found for k in WANTED_STRUCTS):
            for name, value in _alt_structs(fd, alt).items():
                found.setdefault(name, value)
        return _layout_of(found)
    except Exception as exc:  # noqa: BLE001 - pyelftools on untrusted input raises anything
        log.debug("DWARF: unreadable debug file: %s: %s", type(exc).__name__, exc)
        return None


def _alt_structs(fd: int, alt: AltOpener) -> dict[bytes, tuple[int, dict[str, int | tuple[int, int]]]]:
    """The wanted structures from the dwz supplementary file, if verified."""
    link = _altlink(fd)
    if link is None:
        return {}
    path, want_bid = link
    afd = alt(path)
    if afd is None:
        log.debug("DWARF: supplementary file %s not found", path)
        return {}
    try:
        if _section_build_id(afd) != want_bid:
            log.debug("DWARF: supplementary file %s has another build-id", path)
            return {}
        why = debug_file_bounded(afd)
        if why:
            log.debug("DWARF: supplementary file refused: %s", why)
            return {}
        return _dwarf_structs(afd)
    finally:
        os.close(afd)


def _named_sections(fd: int) -> tuple[object, list[tuple[bytes, int, int, int]]]:
    """(ElfFile, [(name, type, offset, size)]) of a file's section headers."""
    from ldfix.elf import ElfFile

    f = ElfFile(fd, os.fstat(fd).st_size)
    secs = f.sections()
    if not secs or f.ehdr.e_shstrndx >= len(secs):
        return f, []
    shstr = secs[f.ehdr.e_shstrndx]
    names = f.pread(shstr[3], min(shstr[4], 1 << 20))
    out = []
    for name_off, stype, _addr, off, size, _link in secs:
        end = names.find(b"\0", name_off)
        out.append((names[name_off:end] if 0 <= name_off < len(names) and end >= 0 else b"", stype, off, size))
    return f, out


def _altlink(fd: int) -> tuple[str, bytes] | None:
    """(path, build-id) from .gnu_debugaltlink: a NUL-terminated path, then the id."""
    f, secs = _named_sections(fd)
    for name, _stype, off, size in secs:
        if name == b".gnu_debugaltlink" and 2 <= size <= 4096 + 64:
            data = f.pread(off, size)  # type: ignore[attr-defined]
            nul = data.find(b"\0")
            if 0 < nul < len(data) - 1:
                return os.fsdecode(data[:nul]), data[nul + 1:]
    return None


def _section_build_id(fd: int) -> bytes | None:
    """The GNU build-id from a SHT_NOTE section (dwz files have no program headers)."""
    from ldfix.elf import NOTE_MAX, build_id_from_notes

    f, secs = _named_sections(fd)
    for _name, stype, off, size in secs:
        if stype == 7 and 0 < size <= NOTE_MAX:  # SHT_NOTE
            bid = build_id_from_notes(f.pread(off, size))  # type: ignore[attr-defined]
            if bid:
                return bid
    return None


def _dwarf_structs(fd: int) -> dict[bytes, tuple[int, dict[str, int | tuple[int, int]]]]:
    """{name: (byte size, member offsets)} of the wanted structures a file's DWARF defines."""
    from elftools.elf.elffile import ELFFile  # lazy: costly import

    found: dict[bytes, tuple[int, dict[str, int | tuple[int, int]]]] = {}
    with os.fdopen(os.dup(fd), "rb") as f:
        elf = ELFFile(f)
        if not elf.has_dwarf_info():
            return found
        dwarf = elf.get_dwarf_info(follow_links=False)
        for i, cu in enumerate(dwarf.iter_CUs()):
            if i > 4096:
                break
            for die in cu.get_top_DIE().iter_children():
                if die.tag != "DW_TAG_structure_type":
                    continue
                attrs = die.attributes
                name = attrs["DW_AT_name"].value if "DW_AT_name" in attrs else None
                if name in WANTED_STRUCTS and name not in found and "DW_AT_byte_size" in attrs:
                    found[name] = (attrs["DW_AT_byte_size"].value, _member_offsets(die))
            if all(k in found for k in WANTED_STRUCTS):
                break
    return found


def _layout_of(found: dict[bytes, tuple[int, dict[str, int | tuple[int, int]]]]) -> GlibcLayout | None:
    if b"link_map" not in found:
        return None
    lm = found[b"link_map"][1]
    fid = lm.get("l_file_id", lm.get("l_dev"))
    if not isinstance(fid, int):
        return None

    def off(members: dict[str, int | tuple[int, int]], name: str) -> int | None:
        v = members.get(name)
        return v if isinstance(v, int) else None

    def bits(name: str) -> tuple[int, int] | None:
        v = lm.get(name)
        return v if isinstance(v, tuple) else None

    rg = found.get(b"rtld_global", (0, {}))[1]
    ns = found.get(b"link_namespaces")
    return GlibcLayout(
        file_id=fid, source="dwarf", l_real=off(lm, "l_real") or table.L_REAL,
        l_ns=off(lm, "l_ns") or table.L_NS, l_phdr=off(lm, "l_phdr"), l_phnum=off(lm, "l_phnum"),
        l_map_start=off(lm, "l_map_start"), l_map_end=off(lm, "l_map_end"),
        l_type=bits("l_type"), l_removed=bits("l_removed"), l_local_scope=off(lm, "l_local_scope"),
        ns_size=ns[0] if ns else None, ns_debug=off(ns[1], "_ns_debug") if ns else None,
        nns=off(rg, "_dl_nns"), load_lock=off(rg, "_dl_load_lock"))


# --- cache ---------------------------------------------------------------------
# Parsing DWARF costs ~0.3 s (pyelftools' import alone ~80 ms); the result
# depends only on the debug file, so it is kept per debug file identity in a
# directory only ldfix's user can write.  Source stays "dwarf": it is exactly
# what that file says.

CACHE_FORMAT = 1


def cache_dir() -> str | None:
    env = os.environ.get("LDFIX_CACHE_DIR")
    if env is not None:
        return env or None
    if os.geteuid() == 0:
        return "/var/cache/ldfix"
    return os.path.join(os.path.expanduser("~"), ".cache", "ldfix")


def _trusted_dir(path: str) -> bool:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def dwarf_glibc_layout_cached(fd: int, build_id: bytes, alt: AltOpener | None = None) -> GlibcLayout | None:
    import json

    st = os.fstat(fd)
    d = cache_dir()
    name = f"dwarf{CACHE_FORMAT}-{build_id.hex()}-{st.st_dev}-{st.st_ino}-{st.st_size}-{st.st_mtime_ns}.json"
    path = os.path.join(d, name) if d and _trusted_dir(d) else None
    if path:
        try:
            with open(path) as f:
                fst = os.fstat(f.fileno())
                if fst.st_uid == os.geteuid() and not fst.st_mode & 0o022:
                    raw = json.load(f)
                    for k in ("l_type", "l_removed"):
                        if raw.get(k) is not None:
                            raw[k] = tuple(raw[k])
                    return GlibcLayout(**raw)
        except (OSError, ValueError, TypeError):
            pass
    # The key is the debug file alone: a supplementary file is used only
    # when it has the build-id the debug file names, so it adds nothing.
    lay = dwarf_glibc_layout(fd, alt)
    if lay is not None and path:
        try:
            tmp = f"{path}.{os.getpid()}"
            fd2 = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd2, "w") as f:
                json.dump(lay._asdict(), f)
            os.replace(tmp, path)
        except OSError:
            pass
    return lay


# --- structure ---------------------------------------------------------------

def structure_scan(maps: Sequence[tuple[int, bytes]], lo: int = 560, hi: int = 1200) -> int | None:
    """Offset of l_local_scope found from the maps' own contents, or None.

    In every ordinary link_map, l_local_scope[0] points back into the same map
    (at l_searchlist), l_scope (one pointer before) is a pointer (to
    l_scope_mem unless reallocated) and l_scope_max (two before) is >= 4 and
    small.  The same (offset, l_searchlist) pair must hold on every map given;
    callers pass the maps with l_real == self except ld.so's own, whose scope
    fields are zero."""
    if len(maps) < 2:
        return None
    candidates: set[tuple[int, int]] | None = None
    for addr, raw in maps:
        here = set()
        top = min(hi, len(raw) - 8)
        # After the first map only the offsets still in the running are
        # tried: a list of thousands of maps costs one window, not thousands.
        ks = range(lo, top + 1, 8) if candidates is None else sorted({k for k, _ in candidates if k <= top})
        for k in ks:
            rel = int.from_bytes(raw[k:k + 8], "little") - addr
            if not (200 <= rel < k - 48):
                continue
            scope = int.from_bytes(raw[k - 8:k], "little")
            scope_max = int.from_bytes(raw[k - 16:k - 8], "little")
            if not (4 <= scope_max <= 1 << 16) or scope < 4096:
                continue
            if scope_max == 4 and scope != addr + k - 48:
                continue  # not reallocated, so it must point at l_scope_mem
            here.add((k, rel))
        candidates = here if candidates is None else candidates & here
        if not candidates:
            return None
    if candidates and len(candidates) == 1:
        return candidates.pop()[0]
    return None


ALL_SOURCES = frozenset({"dwarf", "structure", "table", "probe"})


def probe_scan(maps: Sequence[tuple[bytes, bytes]], zero: Sequence[bytes], lo: int, hi: int) -> int | None:
    """Stat calibration on the target itself: the offset at which maps hold the
    16 bytes (st_dev, st_ino) their file has now.

    `maps` pairs each library's raw struct with its file's current id packed;
    the libraries a restore did not touch (or all of them, before a
    checkpoint) match there, the others nowhere.  Trusted only with at least
    two matching maps of distinct ids, one common offset, and zeros at that
    offset in every raw struct of `zero` (program, loader, vdso)."""
    common: set[int] | None = None
    ids = set()
    for raw, fid in maps:
        hits = set()
        start = raw.find(fid, lo)
        while 0 <= start <= hi:
            if start % 8 == 0:
                hits.add(start)
            start = raw.find(fid, start + 1)
        if not hits:
            continue  # this file has another id now (restored): says nothing
        ids.add(fid)
        common = hits if common is None else common & hits
        if not common:
            return None
    if common is None or len(ids) < 2 or len(common) != 1:
        return None
    off = common.pop()
    if any(raw[off:off + 16] != bytes(16) for raw in zero if len(raw) >= off + 16):
        return None
    return off


def with_source(layout: GlibcLayout, source: str) -> GlibcLayout:
    return layout._replace(source=source)


__all__ = ["GlibcLayout", "layout_from_row", "dwarf_glibc_layout", "structure_scan",
           "debug_file_candidates", "DEFAULT_DEBUG_DIRS", "with_source", "CorruptTarget"]
