"""The few ELF structures ldfix decodes: header, program headers, dynamic
entries, notes, and a dynamic-symbol lookup in a file.

Small and bounded on purpose: these run on bytes from untrusted memory and on
the start-up path of every run (pyelftools costs ~80 ms to import; it is used
only for DWARF, in layout.py)."""

from __future__ import annotations

import struct
from typing import NamedTuple

from ldfix._native import lib as _lib  # type: ignore[import-not-found]
from ldfix.errors import CorruptTarget

PT_LOAD, PT_DYNAMIC, PT_INTERP, PT_NOTE, PT_PHDR = 1, 2, 3, 4, 6
DT_NULL, DT_NEEDED, DT_STRTAB, DT_SYMTAB, DT_SONAME, DT_DEBUG = 0, 1, 5, 6, 14, 21
NT_GNU_BUILD_ID = 3
EHDR_SIZE = 64
PHDR_SIZE = 56
# Bounds shared with the native build-id readers (csrc/ldfix_native.h): one definition.
MAX_PHNUM = _lib.LDFIX_PHNUM_MAX
MAX_DYN = 4096


class Ehdr(NamedTuple):
    e_type: int
    e_machine: int
    e_entry: int
    e_phoff: int
    e_shoff: int
    e_phentsize: int
    e_phnum: int
    e_shentsize: int
    e_shnum: int
    e_shstrndx: int


class Phdr(NamedTuple):
    p_type: int
    p_flags: int
    p_offset: int
    p_vaddr: int
    p_filesz: int
    p_memsz: int


def parse_ehdr(data: bytes) -> Ehdr:
    if len(data) < EHDR_SIZE or data[:4] != b"\x7fELF":
        raise CorruptTarget("not an ELF header")
    if data[4] != 2 or data[5] != 1:
        raise CorruptTarget("not a 64-bit little-endian ELF")
    (e_type, e_machine, _ver, e_entry, e_phoff, e_shoff, _flags, _ehsize, e_phentsize,
     e_phnum, e_shentsize, e_shnum, e_shstrndx) = struct.unpack_from("<HHIQQQIHHHHHH", data, 16)
    return Ehdr(e_type, e_machine, e_entry, e_phoff, e_shoff, e_phentsize, e_phnum,
                e_shentsize, e_shnum, e_shstrndx)


def parse_phdrs(data: bytes, count: int) -> list[Phdr]:
    if count > MAX_PHNUM or len(data) < count * PHDR_SIZE:
        raise CorruptTarget(f"program headers: {count} entries do not fit")
    return [Phdr(t, f, o, v, fs, ms) for t, f, o, v, _pa, fs, ms, _al in
            struct.iter_unpack("<IIQQQQQQ", data[:count * PHDR_SIZE])]


MAX_NOTES = _lib.LDFIX_NOTE_COUNT
NOTE_MAX = _lib.LDFIX_NOTE_MAX  # a larger PT_NOTE is skipped (real ones hold a few dozen bytes)
_PHDR = struct.Struct("<IIQQQQQQ")


def notes_and_first_load(data: bytes, count: int) -> tuple[list[tuple[int, int, int]], tuple[int, int] | None]:
    """From raw program headers, without building objects: every PT_NOTE as
    (p_offset, p_vaddr, p_filesz) (at most MAX_NOTES, each at most NOTE_MAX) and
    the first PT_LOAD as (p_offset, p_filesz)."""
    notes: list[tuple[int, int, int]] = []
    first: tuple[int, int] | None = None
    for t, _f, off, vaddr, _pa, filesz, _ms, _al in _PHDR.iter_unpack(data[:count * PHDR_SIZE]):
        if t == PT_NOTE and filesz <= NOTE_MAX and len(notes) < MAX_NOTES:
            notes.append((off, vaddr, filesz))
        elif t == PT_LOAD and first is None:
            first = (off, filesz)
    return notes, first


def parse_dynamic(data: bytes) -> list[tuple[int, int]]:
    """(tag, value) pairs up to DT_NULL (or the end of data / MAX_DYN entries)."""
    out = []
    for i in range(0, min(len(data), MAX_DYN * 16) - 15, 16):
        tag, val = struct.unpack_from("<qQ", data, i)
        if tag == DT_NULL:
            break
        out.append((tag, val))
    return out


def build_id_from_notes(data: bytes) -> bytes | None:
    """The GNU build-id in a PT_NOTE segment's bytes, if any."""
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        name_end = pos + 12 + ((namesz + 3) & ~3)
        desc_end = name_end + ((descsz + 3) & ~3)
        if desc_end > len(data) or namesz > 256 or descsz > 1024:
            return None
        if ntype == NT_GNU_BUILD_ID and data[pos + 12:pos + 12 + namesz] == b"GNU\0":
            return data[name_end:name_end + descsz]
        pos = desc_end
    return None


class ElfFile:
    """Read-only view of an ELF file through a descriptor (bounded reads)."""

    MAX_SECTION = 64 << 20

    def __init__(self, fd: int, size: int) -> None:
        import os
        self._os = os
        self.fd = fd
        self.size = size
        # One read serves the header, the program headers, the notes and the
        # first page of almost every object; pread() falls back to the file.
        self._head = self._os.pread(fd, min(size, self.HEAD), 0)
        self.header_bytes = self.pread(0, EHDR_SIZE)
        self.ehdr = parse_ehdr(self.header_bytes)
        if self.ehdr.e_phentsize not in (0, PHDR_SIZE):
            raise CorruptTarget("unexpected program header size")
        self.phdr_bytes = self.pread(self.ehdr.e_phoff, self.ehdr.e_phnum * PHDR_SIZE)
        if self.ehdr.e_phnum > MAX_PHNUM:
            raise CorruptTarget(f"program headers: {self.ehdr.e_phnum} entries")

    @property
    def phdrs(self) -> list[Phdr]:
        return parse_phdrs(self.phdr_bytes, self.ehdr.e_phnum)

    HEAD = 8192

    def pread(self, off: int, size: int) -> bytes:
        if off < 0 or size < 0 or off + size > self.size or size > self.MAX_SECTION:
            raise CorruptTarget(f"ELF read out of bounds ({off}+{size} of {self.size})")
        if off + size <= len(self._head):
            return self._head[off:off + size]
        data = self._os.pread(self.fd, size, off)
        if len(data) != size:
            raise CorruptTarget("short read from ELF file")
        return data

    def build_id(self, notes: list[tuple[int, int, int]] | None = None) -> bytes | None:
        """The GNU build-id from any PT_NOTE (`notes` from notes_and_first_load, if known)."""
        if notes is None:
            notes, _ = notes_and_first_load(self.phdr_bytes, self.ehdr.e_phnum)
        for off, _vaddr, size in notes:
            bid = build_id_from_notes(self.pread(off, size))
            if bid:
                return bid
        return None

    def sections(self) -> list[tuple[int, int, int, int, int, int]]:
        """(name_off, type, addr, offset, size, link) of every section header."""
        e = self.ehdr
        if e.e_shoff == 0 or e.e_shnum == 0 or e.e_shnum > 4096 or e.e_shentsize != 64:
            return []
        raw = self.pread(e.e_shoff, e.e_shnum * 64)
        out = []
        for i in range(e.e_shnum):
            name, stype, _flags, addr, off, size, link, _info, _align, _entsize = \
                struct.unpack_from("<IIQQQQIIQQ", raw, i * 64)
            out.append((name, stype, addr, off, size, link))
        return out

    def dynamic_symbol(self, wanted: bytes) -> tuple[int, int] | None:
        """(st_value, st_size) of a defined dynamic symbol, from .dynsym."""
        secs = self.sections()
        for _name, stype, _addr, off, size, link in secs:
            if stype != 11 or link >= len(secs):  # SHT_DYNSYM
                continue
            strtab = secs[link]
            syms = self.pread(off, size)
            strs = self.pread(strtab[3], strtab[4])
            for i in range(0, len(syms) - 23, 24):
                st_name, _info, _other, shndx, value, st_size = struct.unpack_from("<IBBHQQ", syms, i)
                if shndx == 0 or st_name >= len(strs):
                    continue
                end = strs.find(b"\0", st_name)
                if end >= 0 and strs[st_name:end] == wanted:  # -1 would cut a byte off
                    return value, st_size
        return None

    def load_segments(self) -> list[Phdr]:
        return [p for p in self.phdrs if p.p_type == PT_LOAD]
