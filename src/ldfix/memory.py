"""One memory-reader interface, two backends: a live process and a crafted image.

Everything above this module reads target memory only through `Memory`, so
every parser runs the same on a real process and on hostile test images."""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Sequence
from typing import Protocol

from ldfix import native
from ldfix.native import (WALK_BAD_POINTER, WALK_BUDGET, WALK_CYCLE, WALK_END, WALK_PREV_MISMATCH,
                          WALK_UNREADABLE)
from ldfix.errors import MemoryFault, from_oserror

# No single read of target memory is larger than this.
MAX_READ = 1 << 20


# Runs a prepared swap: ("ok", -1), ("changed", i): id i no longer held its
# old value and nothing was written, or ("unwritten", i): id i did not read
# back as written.
Swapper = Callable[[], tuple[str, int]]


def swap16(mem: Memory, addrs: list[int], old: list[bytes], new: list[bytes]) -> Swapper:
    """Check every id still holds `old`, write `new` to all, read back: prepared
    now, run under the freeze.  One native call on a live process."""
    if isinstance(mem, ProcessMemory):
        return mem.swap16(addrs, old, new)

    def run() -> tuple[str, int]:
        reads = [(a, 16) for a in addrs]
        current = mem.read_many(reads)
        for i, (raw, o) in enumerate(zip(current, old)):
            if raw != o:
                return "changed", i
        done = mem.write_many(list(zip(addrs, new)))
        back = mem.read_many(reads)
        for i, (n, raw, nw) in enumerate(zip(done, back, new)):
            if n != 16 or raw != nw:
                return "unwritten", i
        return "ok", -1
    return run


def image_build_ids(mem: Memory, images: Sequence[tuple[int, int]]) -> list[bytes | None]:
    """The build-id of each mapped image [(load bias, start of its ELF
    header)]: one native call on a live process (three batched reads per 256
    images).  None where none was found or the case is unusual, and always
    for a crafted image: identity.image_facts decides those."""
    if isinstance(mem, ProcessMemory):
        try:
            return native.image_build_ids(mem.pid, mem._memfd, images)
        except OSError as exc:
            raise from_oserror(exc, mem.pid, "read memory") from None
    return [None] * len(images)


class Memory(Protocol):
    @property
    def pid(self) -> int | None:
        """The process behind this memory, if any (for messages)."""

    def read_many(self, regions: Sequence[tuple[int, int]]) -> list[bytes]:
        """Read each (address, size); a region that faults comes back short."""

    def write_many(self, regions: Sequence[tuple[int, bytes]]) -> list[int]:
        """Write each (address, data); returns the bytes written for each."""


def read(mem: Memory, addr: int, size: int) -> bytes:
    """Exactly `size` bytes at `addr`, or MemoryFault."""
    if size < 0 or size > MAX_READ or addr <= 0 or addr + size > 1 << 64:
        raise MemoryFault(addr, size, pid=mem.pid)
    data = mem.read_many([(addr, size)])[0]
    if len(data) != size:
        raise MemoryFault(addr + len(data), size - len(data), pid=mem.pid)
    return data


def read_ptr(mem: Memory, addr: int, ptr_size: int = 8) -> int:
    return int.from_bytes(read(mem, addr, ptr_size), "little")


def read_cstring(mem: Memory, addr: int, limit: int = 4096) -> tuple[bytes, bool]:
    """The NUL-terminated string at `addr`, at most `limit` bytes.

    Returns (bytes, complete); complete is False when no NUL came within the
    limit or memory ended first.  Reads page by page so that a string near the
    end of a mapping is still found."""
    if addr <= 0:
        raise MemoryFault(addr, 1, pid=mem.pid)
    out = b""
    pos = addr
    while len(out) < limit:
        chunk = min(4096 - (pos % 4096), limit - len(out))
        data = mem.read_many([(pos, chunk)])[0]
        nul = data.find(b"\0")
        if nul >= 0:
            return out + data[:nul], True
        out += data
        if len(data) < chunk:
            if not out:
                raise MemoryFault(pos, chunk, pid=mem.pid)
            return out, False
        pos += chunk
    return out, False


def _check_sizes(regions: Sequence[tuple[int, int]], pid: int | None) -> None:
    """A size out of bounds is the caller's mistake: refuse the whole batch."""
    for addr, size in regions:
        if size < 0 or size > MAX_READ:
            raise MemoryFault(addr, size, pid=pid)


def _addressable(addr: int, size: int) -> bool:
    return 0 <= addr < 1 << 64 and addr + size <= 1 << 64


class ProcessMemory:
    """Memory of a live process: process_vm_readv/writev in batches, with
    /proc/PID/mem (opened once) as the fallback."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._memfd = -1
        try:
            self._memfd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise from_oserror(exc, pid, "open /proc/PID/mem") from None

    def close(self) -> None:
        if self._memfd >= 0:
            os.close(self._memfd)
            self._memfd = -1

    def __enter__(self) -> ProcessMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_many(self, regions: Sequence[tuple[int, int]]) -> list[bytes]:
        _check_sizes(regions, self.pid)
        # An address outside the 64-bit space (a wild pointer from the target)
        # faults like unmapped memory: that region comes back empty, the
        # others are still read.
        inside = [_addressable(addr, size) for addr, size in regions]
        try:
            got = iter(native.vm_read(self.pid, self._memfd,
                                      [r for r, ok in zip(regions, inside) if ok]))
        except OSError as exc:
            raise from_oserror(exc, self.pid, "read memory") from None
        return [next(got) if ok else b"" for ok in inside]

    def write_many(self, regions: Sequence[tuple[int, bytes]]) -> list[int]:
        try:
            return native.vm_write(self.pid, self._memfd, regions)
        except OSError as exc:
            raise from_oserror(exc, self.pid, "write memory") from None

    def swap16(self, addrs: list[int], old: list[bytes], new: list[bytes]) -> Swapper:
        """A prepared check-write-read-back of 16-byte ids (see Swapper)."""
        prepared = native.Swap16(addrs, b"".join(old), b"".join(new))

        def run() -> tuple[str, int]:
            try:
                return prepared.run(self.pid, self._memfd)
            except OSError as exc:
                raise from_oserror(exc, self.pid, "write memory") from None
        return run


class ImageMemory:
    """A crafted address space: sorted, non-overlapping (address, bytes) segments.

    Gaps fault exactly like unmapped memory in a live process (short reads)."""

    def __init__(self, segments: Sequence[tuple[int, bytes | bytearray]], pid: int | None = None) -> None:
        self.pid = pid
        segs = sorted((a, bytearray(b)) for a, b in segments)
        for (a1, b1), (a2, _) in zip(segs, segs[1:]):
            if a1 + len(b1) > a2:
                raise ValueError("overlapping segments")
        self._starts = [a for a, _ in segs]
        self._segs = segs
        self.writes: list[tuple[int, bytes]] = []

    def _locate(self, addr: int) -> tuple[int, bytearray] | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        start, data = self._segs[i]
        if addr >= start + len(data):
            return None
        return start, data

    def read_many(self, regions: Sequence[tuple[int, int]]) -> list[bytes]:
        _check_sizes(regions, self.pid)  # refuse what ProcessMemory refuses
        out = []
        for addr, size in regions:
            got = b""
            pos = addr
            while len(got) < size:
                seg = self._locate(pos)
                if seg is None:
                    break
                start, data = seg
                take = data[pos - start:pos - start + size - len(got)]
                got += bytes(take)
                pos += len(take)
            out.append(got)
        return out

    def write_many(self, regions: Sequence[tuple[int, bytes]]) -> list[int]:
        done = []
        for addr, data in regions:
            seg = self._locate(addr)
            if seg is None or addr + len(data) > seg[0] + len(seg[1]):
                done.append(0)
                continue
            start, buf = seg
            buf[addr - start:addr - start + len(data)] = data
            self.writes.append((addr, bytes(data)))
            done.append(len(data))
        return done


USER_TOP = 1 << 56  # above every user address (x86_64 5-level, aarch64), below kernel space


def walk_list(mem: Memory, head: int, next_off: int, prev_off: int, read_size: int,
              min_size: int, limit: int) -> tuple[list[tuple[int, bytes]], int, int]:
    """Follow a doubly linked list: ([(node address, bytes read)], stop reason, stop address).

    Stops (WALK_*) at a NULL next, after `limit` nodes, at a node seen before,
    at a misaligned or non-user pointer, at a node with fewer than `min_size`
    readable bytes, or where a node's prev does not name the previous node.
    A live process is walked by one native call (one read per node, no Python
    per node); any other Memory by the same rules here."""
    if isinstance(mem, ProcessMemory):
        try:
            return native.walk(mem.pid, mem._memfd, head, next_off, prev_off, read_size, min_size,
                               USER_TOP, limit)
        except OSError as exc:
            raise from_oserror(exc, mem.pid, "walk the loader's list") from None
    nodes: list[tuple[int, bytes]] = []
    seen: set[int] = set()
    need = max(min_size, next_off + 8, prev_off + 8)
    prev, addr = 0, head
    while addr:
        if len(nodes) >= limit:
            return nodes, WALK_BUDGET, addr
        if addr % 8 or addr >= USER_TOP:
            return nodes, WALK_BAD_POINTER, addr
        if addr in seen:
            return nodes, WALK_CYCLE, addr
        seen.add(addr)
        raw = mem.read_many([(addr, read_size)])[0]
        if len(raw) < need:
            return nodes, WALK_UNREADABLE, addr
        if int.from_bytes(raw[prev_off:prev_off + 8], "little") != prev:
            return nodes, WALK_PREV_MISMATCH, addr
        nodes.append((addr, raw))
        prev, addr = addr, int.from_bytes(raw[next_off:next_off + 8], "little")
    return nodes, WALK_END, 0


class Reachable:
    """Which of the nodes seen while planning are still linked, asked under
    the freeze: the (next, prev) words of all `known` nodes are read in one
    batch and each chain is followed through them (one native call on a live
    process); where a chain meets a node not seen before (something was
    added), the rest of it is walked node by node.  A node counts only when
    its prev names its predecessor."""

    def __init__(self, mem: Memory, known: Sequence[int], next_off: int, prev_off: int, limit: int) -> None:
        self.mem, self.known = mem, list(known)
        self.next_off, self.prev_off, self.limit = next_off, prev_off, limit
        self._native = native.Relink(self.known, next_off, prev_off, limit) \
            if isinstance(mem, ProcessMemory) else None

    def __call__(self, heads: Sequence[int]) -> set[int]:
        mem = self.mem
        if self._native is not None and isinstance(mem, ProcessMemory):
            try:
                out, left = self._native.run(mem.pid, mem._memfd, list(heads))
            except OSError as exc:
                raise from_oserror(exc, mem.pid, "re-walk the loader's lists") from None
        else:
            out, left = self._python(heads)
        for addr, prev in left:
            nodes, _stop, _at = walk_list(mem, addr, self.next_off, self.prev_off,
                                          max(self.next_off, self.prev_off) + 8, 0, self.limit)
            if nodes and int.from_bytes(nodes[0][1][self.prev_off:self.prev_off + 8], "little") == prev:
                out.update(a for a, _ in nodes)
        return out

    def _python(self, heads: Sequence[int]) -> tuple[set[int], list[tuple[int, int]]]:
        lo, hi = min(self.next_off, self.prev_off), max(self.next_off, self.prev_off) + 8
        words = self.mem.read_many([(a + lo, hi - lo) for a in self.known])
        links: dict[int, tuple[int, int]] = {}
        for a, raw in zip(self.known, words):
            if len(raw) == hi - lo:
                links[a] = (int.from_bytes(raw[self.next_off - lo:self.next_off - lo + 8], "little"),
                            int.from_bytes(raw[self.prev_off - lo:self.prev_off - lo + 8], "little"))
        known = set(self.known)
        out: set[int] = set()
        left: list[tuple[int, int]] = []
        for head in heads:
            prev, addr, steps = 0, head, 0
            while addr and steps < self.limit:
                if addr not in known:
                    left.append((addr, prev))
                    break
                link = links.get(addr)
                if link is None or link[1] != prev or addr in out:
                    break
                out.add(addr)
                steps += 1
                prev, addr = addr, link[0]
        return out, left
