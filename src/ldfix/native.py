"""Typed wrapper over the cffi module: errno becomes OSError, buffers become bytes."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from ldfix._native import ffi, lib  # type: ignore[import-not-found]

# Buffers the C side fills before Python reads them: not cleared first.
_uncleared = ffi.new_allocator(should_clear_after_alloc=False)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def vm_read(pid: int, memfd: int, regions: Sequence[tuple[int, int]]) -> list[bytes]:
    """Read every (address, size) region; a region that faults comes back short."""
    n = len(regions)
    if n == 0:
        return []
    total = sum(size for _, size in regions)
    addrs = ffi.new("uint64_t[]", [a for a, _ in regions])
    lens = ffi.new("uint64_t[]", [s for _, s in regions])
    buf = _uncleared("unsigned char[]", max(total, 1))
    done = ffi.new("int64_t[]", n)
    _check(lib.ldfix_vm_read(pid, memfd, n, addrs, lens, buf, done), "process_vm_readv")
    raw = ffi.buffer(buf, total)[:]
    got = ffi.unpack(done, n)
    out: list[bytes] = []
    off = 0
    for (_, size), d in zip(regions, got):
        out.append(raw[off:off + d])
        off += size
    return out


def vm_write(pid: int, memfd: int, regions: Sequence[tuple[int, bytes]]) -> list[int]:
    """Write every (address, data) region; returns the bytes written for each."""
    n = len(regions)
    if n == 0:
        return []
    data = b"".join(d for _, d in regions)
    addrs = ffi.new("uint64_t[]", [a for a, _ in regions])
    lens = ffi.new("uint64_t[]", [len(d) for _, d in regions])
    buf = ffi.new("unsigned char[]", data or b"\0")
    done = ffi.new("int64_t[]", n)
    _check(lib.ldfix_vm_write(pid, memfd, n, addrs, lens, buf, done), "process_vm_writev")
    return list(ffi.unpack(done, n))


def open_in_root(rootfd: int, path: bytes) -> int:
    """O_PATH descriptor of `path` resolved with `rootfd` as "/" (openat2 RESOLVE_IN_ROOT)."""
    return _check(lib.ldfix_open_in_root(rootfd, path), "openat2")


def open_regular(pathfd: int) -> int:
    """Readable descriptor of the regular file behind an O_PATH descriptor."""
    return _check(lib.ldfix_open_regular(pathfd), "open")


def probe_files(rootfd: int, paths: Sequence[bytes],
                stored: Sequence[tuple[int, int]] | None) -> list[tuple[int, int, int, int, bytes | None]]:
    """ldfix_probe_files: (errno of the lookup, errno of the open, dev, ino,
    build-id or None) for each path; the build-id only of files whose id is
    not the stored one (none with stored=None)."""
    n = len(paths)
    if n == 0:
        return []
    offs, at = [], 0
    for p in paths:
        offs.append(at)
        at += len(p) + 1
    blob = ffi.new("char[]", b"\0".join(paths) + b"\0")
    c_offs = ffi.new("uint32_t[]", offs)
    c_stored = ffi.new("uint64_t[]", [v for fid in stored for v in fid]) if stored is not None else ffi.NULL
    out = ffi.new("struct ldfix_file[]", n)
    _check(lib.ldfix_probe_files(rootfd, n, blob, c_offs, c_stored, out), "probe files")
    res = []
    for i in range(n):
        f = out[i]
        k = f.bid_len
        res.append((-f.err, -f.open_err, f.dev, f.ino, ffi.buffer(f.bid, k)[:] if k > 0 else None))
    return res


def image_build_ids(pid: int, memfd: int, images: Sequence[tuple[int, int]]) -> list[bytes | None]:
    """ldfix_image_build_ids for [(load bias, start of the ELF header)]: the
    build-id of each mapped image, None where not found or not decided."""
    n = len(images)
    if n == 0:
        return []
    lens = ffi.new("int32_t[]", n)
    bids = ffi.new("unsigned char[]", n * lib.LDFIX_BID_MAX)
    _check(lib.ldfix_image_build_ids(pid, memfd, n, ffi.new("uint64_t[]", [b % (1 << 64) for b, _ in images]),
                                     ffi.new("uint64_t[]", [s % (1 << 64) for _, s in images]), lens, bids),
           "image build-ids")
    raw = ffi.buffer(bids)[:]
    step = lib.LDFIX_BID_MAX
    return [raw[i * step:i * step + k] if (k := lens[i]) > 0 else None for i in range(n)]


class VmaQuery:
    """PROCMAP_QUERY on an open /proc/PID/maps (Linux >= 6.11): the mapping
    covering an address, one ioctl, without reading the whole file."""

    NAME_MAX = 4096

    def __init__(self, mapsfd: int) -> None:
        self.fd = mapsfd
        self._out = ffi.new("struct ldfix_vma *")
        self._name = ffi.new("char[]", self.NAME_MAX)

    def at(self, addr: int, name: bool = False) -> tuple[int, int, int, int, int, int, int, bytes] | None:
        """(start, end, offset, dev major, dev minor, inode, flags, name) of
        the mapping covering addr, None when nothing is mapped there; OSError
        otherwise (ENOTTY or EINVAL: the kernel has no PROCMAP_QUERY)."""
        if not 0 <= addr < 1 << 64:
            return None
        o = self._out
        r = lib.ldfix_vma_query(self.fd, addr, o, self._name if name else ffi.NULL,
                                self.NAME_MAX if name else 0)
        if r == -errno.ENOENT:
            return None
        _check(r, "PROCMAP_QUERY")
        label = ffi.buffer(self._name, o.name_len)[:] if name else b""
        return o.start, o.end, o.offset, o.dev_major, o.dev_minor, o.ino, o.flags, label

    def is_start(self, addr: int) -> bool:
        """Whether a mapping begins at addr (the cheap question, asked ~1000 times a run)."""
        if not 0 <= addr < 1 << 64:
            return False
        r = lib.ldfix_vma_query(self.fd, addr, self._out, ffi.NULL, 0)
        if r == -errno.ENOENT:
            return False
        _check(r, "PROCMAP_QUERY")
        return self._out.start == addr


def ptrace_seize(tid: int, options: int = 0) -> None:
    _check(lib.ldfix_ptrace_seize(tid, options), "PTRACE_SEIZE")


def ptrace_interrupt(tid: int) -> None:
    _check(lib.ldfix_ptrace_interrupt(tid), "PTRACE_INTERRUPT")


def ptrace_detach(tid: int, sig: int = 0) -> None:
    _check(lib.ldfix_ptrace_detach(tid, sig), "PTRACE_DETACH")


def waitpid(tid: int, options: int = 0) -> tuple[int, int]:
    """waitpid with __WALL; returns (pid, status), pid 0 with WNOHANG and nothing ready."""
    status = ffi.new("int *")
    pid = _check(lib.ldfix_waitpid(tid, status, options), "waitpid")
    return pid, int(status[0])


def kcmp_vm(pid1: int, pid2: int) -> bool:
    """True when both processes share one address space (kcmp KCMP_VM)."""
    return _check(lib.ldfix_kcmp_vm(pid1, pid2), "kcmp") == 0


# Why a walk stopped: the C enum, one definition (csrc/ldfix_native.h).
WALK_END, WALK_BUDGET, WALK_CYCLE = lib.LDFIX_WALK_END, lib.LDFIX_WALK_BUDGET, lib.LDFIX_WALK_CYCLE
WALK_BAD_POINTER, WALK_UNREADABLE = lib.LDFIX_WALK_BAD_POINTER, lib.LDFIX_WALK_UNREADABLE
WALK_PREV_MISMATCH = lib.LDFIX_WALK_PREV_MISMATCH


def walk(pid: int, memfd: int, head: int, next_off: int, prev_off: int, read_size: int,
         min_size: int, user_top: int, limit: int) -> tuple[list[tuple[int, bytes]], int, int]:
    """Walk a linked list in one call: ([(address, bytes)], stop reason, stop address)."""
    buf = _uncleared("unsigned char[]", max(1, limit * read_size))
    addrs = ffi.new("uint64_t[]", limit + 1)
    lens = ffi.new("uint32_t[]", max(1, limit))
    stop = ffi.new("int *")
    n = _check(lib.ldfix_walk(pid, memfd, head, next_off, prev_off, read_size, min_size,
                              user_top, limit, buf, addrs, lens, stop), "walk")
    raw = ffi.buffer(buf, n * read_size)[:]
    nodes = [(int(addrs[i]), raw[i * read_size:i * read_size + lens[i]]) for i in range(n)]
    return nodes, int(stop[0]), int(addrs[n])


SWAP_CHANGED_BASE = lib.LDFIX_SWAP_CHANGED_BASE
SWAP_UNWRITTEN_BASE = lib.LDFIX_SWAP_UNWRITTEN_BASE


class Swap16:
    """Arrays for ldfix_swap16, built before the freeze."""

    def __init__(self, addrs: list[int], old: bytes, new: bytes) -> None:
        self.n = len(addrs)
        self.addrs = ffi.new("uint64_t[]", addrs or [0])
        self.old = ffi.new("unsigned char[]", old or b"\0")
        self.new = ffi.new("unsigned char[]", new or b"\0")
        self.scratch = ffi.new("unsigned char[]", max(16 * self.n, 1))
        self.done = ffi.new("int64_t[]", max(self.n, 1))

    def run(self, pid: int, memfd: int) -> tuple[str, int]:
        """("ok", -1) | ("changed", i) | ("unwritten", i)."""
        r = _check(lib.ldfix_swap16(pid, memfd, self.n, self.addrs, self.old, self.new,
                                    self.scratch, self.done), "swap ids")
        if r == 0:
            return "ok", -1
        if r >= SWAP_UNWRITTEN_BASE:
            return "unwritten", r - SWAP_UNWRITTEN_BASE
        return "changed", r - SWAP_CHANGED_BASE


class Relink:
    """Arrays for ldfix_relink over a fixed set of known nodes, built before the freeze."""

    def __init__(self, known: list[int], next_off: int, prev_off: int, limit: int) -> None:
        self.known_list = known
        self.n = len(known)
        self.known = ffi.new("uint64_t[]", known or [0])
        self.reached = ffi.new("unsigned char[]", max(self.n, 1))
        self.next_off, self.prev_off, self.limit = next_off, prev_off, limit

    def run(self, pid: int, memfd: int, heads: list[int]) -> tuple[set[int], list[tuple[int, int]]]:
        """(known nodes reached, [(address, predecessor)] where chains left them)."""
        h = ffi.new("uint64_t[]", heads or [0])
        left_at = ffi.new("uint64_t[]", max(len(heads), 1))
        left_prev = ffi.new("uint64_t[]", max(len(heads), 1))
        left = _check(lib.ldfix_relink(pid, memfd, len(heads), h, self.n, self.known, self.next_off,
                                       self.prev_off, self.limit, self.reached, left_at, left_prev),
                      "relink")
        got = ffi.buffer(self.reached, self.n)[:]
        reached = {a for a, r in zip(self.known_list, got) if r}
        return reached, [(int(left_at[i]), int(left_prev[i])) for i in range(left)]
