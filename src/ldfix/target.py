"""From a pid to the loader's debug structure, without symbols.

auxv -> the main program's program headers -> PT_DYNAMIC -> DT_DEBUG, which
the loader (glibc or musl alike) fills with the address of its r_debug.  The
interpreter (ld.so) is read through /proc/PID/map_files: the very file that
is mapped, whatever the target's mount namespace shows today."""

from __future__ import annotations

import bisect
import errno
from ldfix.log import getLogger
import os
import re
import struct
from typing import NamedTuple

from ldfix import elf, native
from ldfix.errors import CorruptTarget, LdfixError, UnsupportedTarget, from_oserror
from ldfix.memory import Memory, read
from ldfix.procfs import AT_BASE, AT_ENTRY, AT_PHDR, AT_PHNUM, AT_SYSINFO_EHDR, Mapping, Process, parse_maps

log = getLogger("ldfix.target")


class Interpreter(NamedTuple):
    mapping: Mapping
    bias: int
    file: elf.ElfFile
    fd: int
    path: bytes
    start: int = 0   # the loader's image in the target: [start, end)
    end: int = 0

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


class _Starts:
    """Mapping starts kept as the hex text /proc/PID/maps prints (no int() per line)."""

    __slots__ = ("_hex",)

    def __init__(self, hexes: set[bytes]) -> None:
        self._hex = hexes

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, int) and addr >= 0 and (b"%x" % addr) in self._hex


class _QueriedStarts:
    """`addr in starts`, one PROCMAP_QUERY per question (the text, should
    the kernel refuse one)."""

    __slots__ = ("_maps", "_text")

    def __init__(self, maps: _Maps) -> None:
        self._maps = maps
        self._text: _Starts | None = None

    def __contains__(self, addr: object) -> bool:
        if not isinstance(addr, int):
            return False
        if self._text is None:
            try:
                if self._maps.queried:
                    return self._maps.is_start(addr)
            except _NoQuery:
                pass
            self._text = _text_starts(self._maps.raw)
        return addr in self._text


def _text_starts(raw: bytes) -> _Starts:
    # Every line begins "start-end ": a split costs a fifth of a regex.
    return _Starts({line.partition(b"-")[0] for line in raw.splitlines()})


QUERY_UNSUPPORTED = (errno.ENOTTY, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


class _Maps:
    """/proc/PID/maps: asked one address at a time with PROCMAP_QUERY where
    the kernel has it (Linux >= 6.11; LDFIX_PROCMAP_QUERY=0 turns it off), the
    whole text read (once) where it has not or a question needs every line."""

    def __init__(self, proc: Process) -> None:
        self.proc = proc
        self._raw: bytes | None = None
        self._query: native.VmaQuery | None = None
        self._fd = -1
        if os.environ.get("LDFIX_PROCMAP_QUERY", "1") != "0":
            try:
                self._fd = os.open(f"{proc.dir}/maps", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise from_oserror(exc, proc.pid, "open /proc/PID/maps") from None
            self._query = native.VmaQuery(self._fd)

    @property
    def raw(self) -> bytes:
        if self._raw is None:
            self._raw = self.proc.maps_raw()
        return self._raw

    @property
    def queried(self) -> bool:
        return self._query is not None

    def query_at(self, addr: int, name: bool = False) -> Mapping | None:
        """The mapping covering addr, by PROCMAP_QUERY (only when `queried`)."""
        assert self._query is not None
        try:
            got = self._query.at(addr, name)
        except OSError as exc:
            if exc.errno in QUERY_UNSUPPORTED:
                self._drop_query()
                raise _NoQuery() from None
            if exc.errno == errno.ENAMETOOLONG:
                raise _NameTooLong() from None  # over 4 KiB: the text has it
            raise from_oserror(exc, self.proc.pid, "query /proc/PID/maps") from None
        if got is None:
            return None
        start, end, offset, major, minor, ino, flags, label = got
        perms = "".join(c if flags & bit else "-" for c, bit in (("r", 1), ("w", 2), ("x", 4))) + \
            ("s" if flags & 8 else "p")
        return Mapping(start, end, perms, offset, os.makedev(major, minor), ino, label)

    def is_start(self, addr: int) -> bool:
        """Whether a mapping begins at addr, by PROCMAP_QUERY (only when `queried`)."""
        assert self._query is not None
        try:
            return self._query.is_start(addr)
        except OSError as exc:
            if exc.errno in QUERY_UNSUPPORTED:
                self._drop_query()
                raise _NoQuery() from None
            raise from_oserror(exc, self.proc.pid, "query /proc/PID/maps") from None

    def starting_at(self, start: int, name: bool = False) -> Mapping | None:
        if self._query is not None:
            try:
                m = self.query_at(start, name)
                return m if m is not None and m.start == start else None
            except (_NoQuery, _NameTooLong):
                pass
        return _mapping_starting_at(self.raw, start)

    def _drop_query(self) -> None:
        self._query = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        self._drop_query()


class _NoQuery(Exception):
    """The kernel refused PROCMAP_QUERY: the text serves from now on."""


class _NameTooLong(Exception):
    """The mapping's name did not fit the query's buffer: the text serves this question."""


class TargetView:
    """The process as the loader back-ends see it."""

    def __init__(self, proc: Process, mem: Memory, maps: list[Mapping], exe_bias: int,
                 dynamic: list[tuple[int, int]], interp_name: bytes | None, r_debug: int,
                 interp: Interpreter | None, source: _Maps | None = None, vdso_addr: int = 0) -> None:
        self.proc = proc
        self.mem = mem
        self.maps = maps              # parsed lazily from the maps text when `source` is given
        self.exe_bias = exe_bias
        self.dynamic = dynamic
        self.interp_name = interp_name
        self.r_debug = r_debug        # 0 when the loader has not filled DT_DEBUG (yet)
        self.interp = interp
        self.source = source          # /proc/PID/maps, queried or read
        self.vdso_addr = vdso_addr    # AT_SYSINFO_EHDR
        self._index: tuple[list[int], dict[tuple[int, int], int]] | None = None

    def all_maps(self) -> list[Mapping]:
        """Every mapping, parsed on first use (5000 lines cost ~20 ms to parse)."""
        if not self.maps and self.source is not None:
            self.maps = parse_maps(self.source.raw)
        return self.maps

    def _built(self) -> tuple[list[int], dict[tuple[int, int], int]]:
        if self._index is None:
            maps = self.all_maps()
            maps.sort(key=lambda m: m.start)
            file_starts: dict[tuple[int, int], int] = {}
            for m in maps:
                if m.ino:
                    file_starts.setdefault((m.dev, m.ino), m.start)
            self._index = ([m.start for m in maps], file_starts)
        return self._index

    def mapping_at(self, addr: int) -> Mapping | None:
        """The mapping holding addr."""
        starts, _ = self._built()
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0 and addr < self.maps[i].end:
            return self.maps[i]
        return None

    def file_start(self, addr: int) -> int | None:
        """Lowest start of the mappings of the file mapped at addr."""
        m = self.mapping_at(addr)
        if m is None or not m.ino:
            return None
        return self._built()[1].get((m.dev, m.ino))

    def starts(self) -> _Starts | _QueriedStarts:
        """Start addresses of every mapping, for `addr in view.starts()` (no full parse)."""
        if self.source is not None and self.source.queried and not self.maps:
            return _QueriedStarts(self.source)
        if self.maps or self.source is None:
            return _Starts({b"%x" % m.start for m in self.maps})
        return _text_starts(self.source.raw)

    def special(self, name: bytes) -> tuple[int, int] | None:
        """(start, end) of a kernel-named mapping such as b"[vdso]"."""
        if self.maps or self.source is None:
            m = next((m for m in self.maps if m.path == name), None)
            return (m.start, m.end) if m else None
        if name == b"[vdso]" and self.vdso_addr and self.source.queried:
            try:
                m = self.source.query_at(self.vdso_addr, name=True)
                if m is not None and m.path == name:
                    return m.start, m.end
            except (_NoQuery, _NameTooLong):
                pass
        raw = self.source.raw
        i = raw.find(b" " + name + b"\n")
        if i < 0:
            return None
        line = raw[raw.rfind(b"\n", 0, i) + 1:i]
        lo, _, hi = line.split(b" ", 1)[0].partition(b"-")
        return int(lo, 16), int(hi, 16)

    def open_mapped(self, addr: int) -> int | None:
        """A readable descriptor of the regular file mapped at addr, opened
        through /proc/PID/map_files (the very inode mapped, even when its
        path now names another file); None when there is none or it cannot
        be opened (map_files wants CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE)."""
        m = self.mapping_at(addr)
        if m is None or not m.ino:
            return None
        try:
            pfd = os.open(self.proc.map_file_path(m), os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return native.open_regular(pfd)  # never a device or a FIFO
        except OSError:
            return None
        finally:
            os.close(pfd)

    def in_interp(self, addr: int) -> bool:
        """Whether addr lies in the loader's own image."""
        return self.interp is not None and self.interp.start <= addr < self.interp.end

    def close(self) -> None:
        if self.interp:
            self.interp.close()
        if self.source is not None:
            self.source.close()


def _mapping_starting_at(raw: bytes, start: int) -> Mapping | None:
    key = b"%x-" % start
    i = 0 if raw.startswith(key) else raw.find(b"\n" + key) + 1
    if i <= 0 and not raw.startswith(key):
        return None
    end = raw.find(b"\n", i)
    found = parse_maps(raw[i:end if end >= 0 else len(raw)])
    return found[0] if found else None


def open_target(proc: Process, mem: Memory) -> TargetView:
    aux = proc.auxv
    source = _Maps(proc)
    try:
        return _open_target(proc, mem, aux, source)
    except BaseException:
        source.close()
        raise


def _open_target(proc: Process, mem: Memory, aux: dict[int, int], source: _Maps) -> TargetView:
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
    interp = _open_interpreter(proc, source, at_base) if at_base else None
    return TargetView(proc, mem, [], bias, dynamic, interp_name, r_debug, interp, source,
                      aux.get(AT_SYSINFO_EHDR, 0))


def _open_interpreter(proc: Process, source: _Maps, at_base: int) -> Interpreter:
    first = source.starting_at(at_base, name=True)
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
    high = max((p.p_vaddr + p.p_memsz for p in loads), default=0)
    bias = at_base - low
    return Interpreter(first, bias, f, fd, first.path, at_base, bias + high)
