"""From a pid to the loader's debug structure, without symbols.

auxv -> the main program's program headers -> PT_DYNAMIC -> DT_DEBUG, which
the loader (glibc or musl alike) fills with the address of its r_debug.  The
interpreter (ld.so) is read through /proc/PID/map_files: the very file that
is mapped, whatever the target's mount namespace shows today."""

from __future__ import annotations

import bisect
import logging
import os
import re
import struct
from dataclasses import dataclass

from ldfix import elf
from ldfix.errors import CorruptTarget, LdfixError, UnsupportedTarget, from_oserror
from ldfix.memory import Memory, read
from ldfix.procfs import AT_BASE, AT_ENTRY, AT_PHDR, AT_PHNUM, Mapping, Process

log = logging.getLogger("ldfix.target")


@dataclass
class Interpreter:
    mapping: Mapping
    bias: int
    file: elf.ElfFile
    fd: int
    path: bytes

    def close(self) -> None:
        os.close(self.fd)

    def symbol(self, name: bytes) -> int | None:
        sym = self.file.dynamic_symbol(name)
        return None if sym is None else self.bias + sym[0]

    def banner_version(self, pattern: bytes) -> str | None:
        """First match of `pattern` (one group) in the file, read in bounded chunks."""
        rx = re.compile(pattern)
        size = min(self.file.size, 16 << 20)
        chunk, overlap, off = 1 << 20, 256, 0
        while off < size:
            data = os.pread(self.fd, chunk + overlap, off)
            m = rx.search(data)
            if m:
                return m.group(1).decode("ascii", "replace")
            off += chunk
        return None


@dataclass
class TargetView:
    proc: Process
    mem: Memory
    maps: list[Mapping]
    exe_bias: int
    dynamic: list[tuple[int, int]]
    interp_name: bytes | None
    r_debug: int              # 0 when the loader has not filled DT_DEBUG (yet)
    interp: Interpreter | None

    def mapping_at(self, addr: int) -> Mapping | None:
        """The mapping holding addr (maps are sorted by start, as the kernel lists them)."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self.maps[i].end:
            return self.maps[i]
        return None

    def file_start(self, addr: int) -> int | None:
        """Lowest start of the mappings of the file mapped at addr."""
        m = self.mapping_at(addr)
        if m is None or not m.ino:
            return None
        return self._file_starts.get((m.dev, m.ino))

    def __post_init__(self) -> None:
        self.maps.sort(key=lambda m: m.start)
        self._starts = [m.start for m in self.maps]
        self._file_starts: dict[tuple[int, int], int] = {}
        for m in self.maps:
            if m.ino:
                self._file_starts.setdefault((m.dev, m.ino), m.start)

    def close(self) -> None:
        if self.interp:
            self.interp.close()


def open_target(proc: Process, mem: Memory) -> TargetView:
    aux = proc.auxv
    maps = proc.maps()
    phdr_addr, phnum = aux.get(AT_PHDR, 0), aux.get(AT_PHNUM, 0)
    if not phdr_addr or not (0 < phnum <= elf.MAX_PHNUM):
        raise UnsupportedTarget(f"pid {proc.pid}: no program headers in auxv", pid=proc.pid)
    phdrs = elf.parse_phdrs(read(mem, phdr_addr, phnum * elf.PHDR_SIZE), phnum)
    bias = None
    for ph in phdrs:
        if ph.p_type == elf.PT_PHDR:
            bias = phdr_addr - ph.p_vaddr
    if bias is None:
        ehdr = elf.parse_ehdr(proc.exe_header)
        bias = aux.get(AT_ENTRY, 0) - ehdr.e_entry
    interp_name = None
    dynamic: list[tuple[int, int]] = []
    for ph in phdrs:
        if ph.p_type == elf.PT_INTERP and 0 < ph.p_filesz <= 4096:
            interp_name = read(mem, bias + ph.p_vaddr, ph.p_filesz).split(b"\0")[0]
        elif ph.p_type == elf.PT_DYNAMIC:
            size = min(ph.p_memsz, elf.MAX_DYN * 16)
            dynamic = elf.parse_dynamic(read(mem, bias + ph.p_vaddr, size))
    at_base = aux.get(AT_BASE, 0)
    if not dynamic or (interp_name is None and at_base == 0):
        raise UnsupportedTarget(f"pid {proc.pid}: static binary (no dynamic loader)", pid=proc.pid)
    r_debug = 0
    for tag, val in dynamic:
        if tag == elf.DT_DEBUG:
            r_debug = val
    interp = _open_interpreter(proc, maps, at_base) if at_base else None
    return TargetView(proc, mem, maps, bias, dynamic, interp_name, r_debug, interp)


def _open_interpreter(proc: Process, maps: list[Mapping], at_base: int) -> Interpreter:
    first = next((m for m in maps if m.start == at_base), None)
    if first is None or not first.ino:
        raise CorruptTarget(f"pid {proc.pid}: no file mapped at the loader's base 0x{at_base:x}",
                            pid=proc.pid)
    path = proc.map_file_path(first)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror(exc, proc.pid, "open the loader through /proc/PID/map_files") from None
    try:
        size = os.fstat(fd).st_size
        f = elf.ElfFile(fd, size)
    except (OSError, LdfixError, struct.error) as exc:
        os.close(fd)
        raise CorruptTarget(f"pid {proc.pid}: the mapped loader is not a readable ELF file ({exc})",
                            pid=proc.pid) from None
    loads = f.load_segments()
    low = min((p.p_vaddr for p in loads), default=0) & ~0xFFF
    return Interpreter(first, at_base - low, f, fd, first.path)
