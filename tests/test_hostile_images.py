"""Hostile input for the glibc walker, on crafted address spaces (ImageMemory).

Every case must end quickly (well under a second) with an LdfixError, or with
a partial result and a warning: never a hang, another exception type, or a
write.  64-bit little-endian images; the public link_map prefix and r_debug
offsets are those of reference/loader-layouts.md (T4, section 2)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldfix import elf
from ldfix import layouts_table as table
from ldfix.errors import CorruptTarget, LdfixError, MemoryFault
from ldfix.identity import (
    FileFacts,
    Probe,
    FileProblem,
    ImageFacts,
    file_facts,
    image_facts,
    same_content,
)
from ldfix.layout import GlibcLayout, structure_scan
from ldfix.loaders.glibc import (
    MAX_NAMESPACES,
    MAX_OBJECTS,
    NAME_LIMIT,
    WINDOW,
    GlibcBackend,
    RawMap,
    _read_names,
    find_namespaces,
    read_r_debug,
    walk_chain,
)
from ldfix.memory import MAX_READ, ImageMemory, ProcessMemory, read
from ldfix.model import FileId, Inspection, Status
from ldfix.procfs import Mapping
from ldfix.target import TargetView

# --- time bound ------------------------------------------------------------------

# Seconds; every hostile case must finish well under this.  A run under a
# tracer (coverage) may raise it with LDFIX_HOSTILE_LIMIT.
LIMIT = float(os.environ.get("LDFIX_HOSTILE_LIMIT", "1.0"))


class Hang(BaseException):
    """From the alarm.  A BaseException, so that no `except Exception` in the
    code under test can swallow it."""


@contextlib.contextmanager
def bounded(limit: float = LIMIT) -> Iterator[None]:
    """Fail (instead of blocking CI) on a hang; fail on anything slower than `limit`."""

    def on_alarm(_sig: int, _frame: object) -> None:
        raise Hang(f"still running after {5 * limit:.0f}s: a hang")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 5 * limit)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    elapsed = time.monotonic() - start
    assert elapsed < limit, f"took {elapsed:.2f}s (limit {limit}s)"


# --- crafted address spaces ------------------------------------------------------

L_ADDR, L_NAME, L_LD, L_NEXT, L_PREV, L_REAL, L_NS = 0, 8, 16, 24, 32, 40, 48
MAP_SIZE = 0x500          # >= WINDOW: a link_map placed alone is fully readable
R_DEBUG = 0x7000          # where the base r_debug goes
MAPS_AT = 0x10000         # where link_maps go
NAMES_AT = 0x400000       # where the l_name strings go
UNMAPPED = 0x7fff_0000_0000
KERNEL = (0xffff_8000_0000_0000, 0xffff_0000_0000_0000, (1 << 64) - 8, 1 << 56)
MASK64 = (1 << 64) - 1


class Image(ImageMemory):
    """ImageMemory that also records every write attempt (even one that a
    gap would refuse, which ImageMemory.writes does not) and the bytes asked."""

    def __init__(self, segments: Sequence[tuple[int, bytes | bytearray]]) -> None:
        super().__init__(segments)
        self.write_attempts: list[tuple[int, bytes]] = []
        self.bytes_asked = 0

    def read_many(self, regions: Sequence[tuple[int, int]]) -> list[bytes]:
        self.bytes_asked += sum(max(size, 0) for _, size in regions)
        return super().read_many(regions)

    def write_many(self, regions: Sequence[tuple[int, bytes]]) -> list[int]:
        self.write_attempts.extend(regions)
        return super().write_many(regions)

    def assert_untouched(self) -> None:
        assert self.write_attempts == [] and self.writes == []


def link_map(addr: int, *, name: int = 0, nxt: int = 0, prev: int = 0, real: int | None = None,
             ns: int = 0, l_addr: int = 0, l_ld: int = 0, size: int = MAP_SIZE) -> bytearray:
    raw = bytearray(size)
    struct.pack_into("<7Q", raw, 0, l_addr, name, l_ld, nxt, prev, addr if real is None else real, ns)
    return raw


def r_debug(*, version: int = 1, r_map: int = 0, brk: int = 0, state: int = 0, ldbase: int = 0,
            r_next: int = 0) -> bytes:
    """struct r_debug_extended: r_version int @0, r_map @8, r_brk @16, r_state int @24,
    r_ldbase @32, r_next @40."""
    return struct.pack("<i4xQQi4xQQ", version, r_map, brk, state, ldbase, r_next)


def chain(n: int, *, at: int = MAPS_AT, stride: int = MAP_SIZE, names: bool = True,
          names_at: int = NAMES_AT) -> tuple[list[tuple[int, bytearray]], list[int]]:
    """Segments of a well-formed list of n link_maps (contiguous, `stride` apart) and
    their names: "" for the first (the program), /lib/libN.so for the others."""
    addrs = [at + i * stride for i in range(n)]
    maps = bytearray(n * stride + max(0, MAP_SIZE - stride))
    strings = bytearray()
    for i, a in enumerate(addrs):
        name = 0
        if names:
            name = names_at + len(strings)
            strings += (b"/lib/lib%d.so" % i if i else b"") + b"\0"
        struct.pack_into("<7Q", maps, i * stride, 0, name, 0, addrs[i + 1] if i + 1 < n else 0,
                         addrs[i - 1] if i else 0, a, 0)
    segs = [(at, maps)]
    if strings:
        segs.append((names_at, strings))
    return segs, addrs


def poke(segs: list[tuple[int, bytearray]], addr: int, value: int) -> None:
    """Write one 64-bit word at `addr` inside the crafted segments."""
    for start, buf in segs:
        if start <= addr and addr + 8 <= start + len(buf):
            struct.pack_into("<Q", buf, addr - start, value & MASK64)
            return
    raise AssertionError(f"0x{addr:x} is not inside the image")


def walk_all(mem: Image, r_dbg: int, rtld_global: int | None = None,
             layout: GlibcLayout | None = None) -> tuple[list[RawMap], list[str], dict[int, bytes]]:
    """What GlibcBackend.analyse does before the layout: every namespace, every
    list, every name."""
    heads, warnings = find_namespaces(mem, r_dbg, rtld_global, layout)
    maps: list[RawMap] = []
    budget = MAX_OBJECTS
    for pos, (_hint, _dbg, head) in enumerate(heads):
        got, problem = walk_chain(mem, head, budget, pos)
        budget -= len(got)
        maps += got
        if problem:
            warnings.append(problem)
    return maps, warnings, _read_names(mem, maps)


# --- the baseline: a well-formed image walks completely ----------------------------

def test_well_formed_image_walks_completely() -> None:
    segs, addrs = chain(5)
    mem = Image([(R_DEBUG, r_debug(version=2, r_map=addrs[0])), *segs])
    with bounded():
        maps, warnings, names = walk_all(mem, R_DEBUG)
    assert [m.addr for m in maps] == addrs
    assert warnings == []
    assert names[addrs[0]] == b""
    assert [names[a] for a in addrs[1:]] == [b"/lib/lib%d.so" % i for i in range(1, 5)]
    assert len(maps[0].raw) == WINDOW
    mem.assert_untouched()


# --- l_next / l_prev ------------------------------------------------------------------

@pytest.mark.parametrize("n, back_to", [(1, 0), (3, 0), (5, 2), (10_000, 0)],
                         ids=["self-loop", "back-to-head", "back-to-middle", "ring-of-10000"])
def test_cycle_in_l_next_is_cut(n: int, back_to: int) -> None:
    segs, addrs = chain(n, stride=64 if n > 100 else MAP_SIZE, names=False)
    poke(segs, addrs[-1] + L_NEXT, addrs[back_to])
    mem = Image(segs)
    with bounded():
        maps, problem = walk_chain(mem, addrs[0], MAX_OBJECTS, 0)
    assert [m.addr for m in maps] == addrs  # each map once, in order
    assert problem is not None and "cycle" in problem and f"0x{addrs[back_to]:x}" in problem
    mem.assert_untouched()


def test_l_prev_not_pointing_back_stops_the_walk() -> None:
    segs, addrs = chain(4)
    poke(segs, addrs[2] + L_PREV, 0xdead0)
    mem = Image(segs)
    with bounded():
        maps, problem = walk_chain(mem, addrs[0], MAX_OBJECTS, 0)
    assert [m.addr for m in maps] == addrs[:2]  # the map that fails the check is not taken
    assert problem is not None and "l_prev" in problem and "0xdead0" in problem


def test_head_with_an_l_prev_is_refused() -> None:
    segs, addrs = chain(3)
    poke(segs, addrs[0] + L_PREV, addrs[2])  # a head has no predecessor
    with bounded():
        maps, problem = walk_chain(Image(segs), addrs[0], MAX_OBJECTS, 0)
    assert maps == [] and problem is not None and "l_prev" in problem


@pytest.mark.parametrize("bad", [MAPS_AT + 4, MAPS_AT + 1, *KERNEL],
                         ids=["misaligned-4", "misaligned-1", "x86_64-kernel", "aarch64-kernel",
                              "top-of-space", "2**56"])
def test_misaligned_or_kernel_l_next(bad: int) -> None:
    segs, addrs = chain(3)
    poke(segs, addrs[1] + L_NEXT, bad)
    mem = Image(segs)
    with bounded():
        maps, problem = walk_chain(mem, addrs[0], MAX_OBJECTS, 0)
        head_maps, head_problem = walk_chain(mem, bad, MAX_OBJECTS, 0)
    assert [m.addr for m in maps] == addrs[:2]
    assert problem is not None and "impossible address" in problem
    assert head_maps == [] and head_problem is not None and "impossible address" in head_problem


def test_l_next_into_unmapped_memory_or_a_cut_map() -> None:
    segs, addrs = chain(3)
    poke(segs, addrs[1] + L_NEXT, UNMAPPED)
    tail = MAPS_AT + 0x100000
    segs.append((tail, link_map(tail, prev=addrs[2])[:40]))  # only 40 bytes readable
    poke(segs, addrs[2] + L_NEXT, tail)
    with bounded():
        maps, problem = walk_chain(Image(segs), addrs[0], MAX_OBJECTS, 0)
        assert [m.addr for m in maps] == addrs[:2]
        assert problem is not None and "unreadable" in problem
        poke(segs, addrs[1] + L_NEXT, addrs[2])
        maps, problem = walk_chain(Image(segs), addrs[0], MAX_OBJECTS, 0)
    assert [m.addr for m in maps] == addrs
    assert problem is not None and f"0x{tail:x} is unreadable" in problem


def test_link_maps_above_2_pow_47_are_user_space() -> None:
    # aarch64 (48-bit VA) maps ld.so and the link_maps it allocates at 0xffff........
    segs, addrs = chain(3, at=0xffff_a7b4_0000, names_at=0xffff_a7c0_0000)
    mem = Image([(0xffff_a7a0_0000, r_debug(version=2, r_map=addrs[0])), *segs])
    with bounded():
        maps, warnings, names = walk_all(mem, 0xffff_a7a0_0000)
    assert [m.addr for m in maps] == addrs and warnings == []
    assert names[addrs[2]] == b"/lib/lib2.so"


def test_100000_entry_list_is_cut_at_max_objects() -> None:
    segs, addrs = chain(100_000, stride=64, names=False)
    mem = Image(segs)
    with bounded():
        maps, problem = walk_chain(mem, addrs[0], MAX_OBJECTS, 0)
        names = _read_names(mem, maps)
    assert len(maps) == MAX_OBJECTS
    assert [m.addr for m in maps[:3]] == addrs[:3] and maps[-1].addr == addrs[MAX_OBJECTS - 1]
    assert problem is not None and "truncated" in problem
    assert len(names) == MAX_OBJECTS
    # A spent budget (the earlier namespaces took it all) takes nothing more.
    with bounded():
        rest, problem = walk_chain(mem, addrs[0], 0, 1)
    assert rest == [] and problem is not None
    mem.assert_untouched()


# --- l_name --------------------------------------------------------------------------

@pytest.mark.parametrize("bad_name", [UNMAPPED, *KERNEL, (1 << 64) - 16, NAMES_AT - 3],
                         ids=["unmapped", "x86_64-kernel", "aarch64-kernel", "top-of-space", "2**56",
                              "top-minus-16", "just-before-the-strings"])
def test_l_name_pointing_to_unmapped_memory(bad_name: int) -> None:
    segs, addrs = chain(4)
    poke(segs, addrs[2] + L_NAME, bad_name)
    mem = Image(segs)
    with bounded():
        maps, problem = walk_chain(mem, addrs[0], MAX_OBJECTS, 0)
        names = _read_names(mem, maps)
    assert problem is None and set(names) == set(addrs)
    # The other names are read in the same batch, untouched by the bad one.
    assert names[addrs[1]] == b"/lib/lib1.so" and names[addrs[3]] == b"/lib/lib3.so"
    assert not names[addrs[2]].startswith(b"/")  # nothing read is passed off as a path
    assert len(names[addrs[2]]) <= NAME_LIMIT + 32
    mem.assert_untouched()


@pytest.mark.parametrize("fill", [b"A", b"/"])
def test_one_mebibyte_name_without_nul(fill: bytes) -> None:
    segs, addrs = chain(3)
    huge = 0x1000_0000
    segs.append((huge, bytearray(fill * (1 << 20))))  # 1 MiB, no NUL, then unmapped memory
    poke(segs, addrs[1] + L_NAME, huge)
    mem = Image(segs)
    maps, _ = walk_chain(mem, addrs[0], MAX_OBJECTS, 0)
    mem.bytes_asked = 0
    with bounded():
        names = _read_names(mem, maps)
    name = names[addrs[1]]
    assert name.startswith(fill * 256)
    assert len(name) <= NAME_LIMIT + 32 and name != fill * NAME_LIMIT
    assert name.endswith(b"(truncated)")  # never shown as if complete
    assert names[addrs[2]] == b"/lib/lib2.so"
    assert mem.bytes_asked <= 3 * 256 + 2 * NAME_LIMIT  # bounded reads, not 1 MiB


def test_name_running_into_unmapped_memory_is_not_taken_as_complete() -> None:
    segs, addrs = chain(2)
    end = 0x2000_0000
    segs.append((end, bytearray(b"/usr/lib/libc.so.6")))  # ends with the mapping, no NUL
    poke(segs, addrs[1] + L_NAME, end)
    with bounded():
        names = _read_names(Image(segs), walk_chain(Image(segs), addrs[0], MAX_OBJECTS, 0)[0])
    assert names[addrs[1]].startswith(b"/usr/lib/libc.so.6")
    assert names[addrs[1]] != b"/usr/lib/libc.so.6"


# --- r_debug and r_next -----------------------------------------------------------------

@pytest.mark.parametrize("where", [0, UNMAPPED, R_DEBUG + 4096 - 20, *KERNEL],
                         ids=["null", "unmapped", "cut-short", "x86_64-kernel", "aarch64-kernel",
                              "top-of-space", "2**56"])
def test_r_debug_unmapped_is_a_memory_fault(where: int) -> None:
    segs, _ = chain(2)
    mem = Image([(R_DEBUG, bytearray(4096)), *segs])
    with bounded():
        with pytest.raises(MemoryFault):
            read_r_debug(mem, where)
        with pytest.raises(MemoryFault):
            find_namespaces(mem, where, None, None)
    mem.assert_untouched()


@pytest.mark.parametrize("r_map", [0xdeadbeef, MAPS_AT + 3, *KERNEL, UNMAPPED, R_DEBUG])
def test_r_debug_with_garbage_r_map(r_map: int) -> None:
    segs, _ = chain(2)
    mem = Image([(R_DEBUG, r_debug(version=1, r_map=r_map)), *segs])
    with bounded():
        heads, _warnings = find_namespaces(mem, R_DEBUG, None, None)
        assert heads == [(0, R_DEBUG, r_map)]
        maps, problem = walk_chain(mem, r_map, MAX_OBJECTS, 0)
    assert maps == [] and problem is not None


def test_r_debug_of_garbage_bytes() -> None:
    garbage = bytearray((i * 37 + 11) & 0xFF for i in range(4096))
    mem = Image([(R_DEBUG, garbage)])
    with bounded(), pytest.raises(MemoryFault):  # r_version >= 2, and r_next leads nowhere
        walk_all(mem, R_DEBUG)
    mem.assert_untouched()
    struct.pack_into("<i", garbage, 0, 1)  # r_version 1: no r_next to follow
    mem = Image([(R_DEBUG, garbage)])
    with bounded():
        maps, warnings, _ = walk_all(mem, R_DEBUG)
    assert maps == [] and len(warnings) == 2  # "base namespace only", and r_map leads nowhere
    mem.assert_untouched()


def test_r_version_2_without_a_readable_r_next() -> None:
    segs, addrs = chain(2)
    mem = Image([(R_DEBUG, r_debug(version=2, r_map=addrs[0])[:40]), *segs])  # no room for r_next
    with bounded(), pytest.raises(MemoryFault):
        find_namespaces(mem, R_DEBUG, None, None)


def test_negative_r_version_has_no_r_next() -> None:
    segs, addrs = chain(2)
    mem = Image([(R_DEBUG, r_debug(version=-5, r_map=addrs[0], r_next=UNMAPPED)), *segs])
    with bounded():
        heads, warnings = find_namespaces(mem, R_DEBUG, None, None)
    assert heads == [(0, R_DEBUG, addrs[0])]
    assert warnings  # only the base namespace, and it says so


def _r_debugs(count: int, r_maps: list[int], nexts: list[int]) -> bytearray:
    buf = bytearray()
    for i in range(count):
        buf += r_debug(version=2, r_map=r_maps[i], r_next=nexts[i])
    return buf


@pytest.mark.parametrize("loop_to", [0, 1, 2], ids=["to-base", "to-first", "self"])
def test_r_next_chain_that_loops(loop_to: int) -> None:
    segs, addrs = chain(3)
    at = [R_DEBUG + 48 * i for i in range(3)]
    mem = Image([(R_DEBUG, _r_debugs(3, [addrs[0], addrs[1], addrs[2]], [at[1], at[2], at[loop_to]])),
                 *segs])
    with bounded():
        heads, warnings = find_namespaces(mem, R_DEBUG, None, None)
    assert [h[2] for h in heads] == addrs  # each namespace once
    assert any("loops" in w for w in warnings)
    mem.assert_untouched()


def test_r_next_chain_longer_than_dl_nns_is_cut() -> None:
    n = 100
    at = [R_DEBUG + 48 * i for i in range(n)]
    mem = Image([(R_DEBUG, _r_debugs(n, [MAPS_AT] * n, at[1:] + [0]))])
    with bounded():
        heads, warnings = find_namespaces(mem, R_DEBUG, None, None)
    assert len(heads) == MAX_NAMESPACES
    assert warnings and str(MAX_NAMESPACES) in warnings[0]


@pytest.mark.parametrize("r_next", [UNMAPPED, *KERNEL])
def test_r_next_into_unmapped_or_kernel_memory(r_next: int) -> None:
    segs, addrs = chain(2)
    mem = Image([(R_DEBUG, r_debug(version=2, r_map=addrs[0], r_next=r_next)), *segs])
    with bounded(), pytest.raises(MemoryFault):
        find_namespaces(mem, R_DEBUG, None, None)
    mem.assert_untouched()


def test_r_next_misaligned_into_readable_garbage() -> None:
    segs, addrs = chain(2)
    buf = bytearray(4096)
    buf[:48] = r_debug(version=2, r_map=addrs[0], r_next=R_DEBUG + 48 + 3)
    buf[51:51 + 48] = r_debug(version=7, r_map=0xffff_ffff_ffff_fff8, r_next=R_DEBUG + 3)
    mem = Image([(R_DEBUG, buf), *segs])
    with bounded():
        maps, warnings, _names = walk_all(mem, R_DEBUG)
    assert [m.addr for m in maps] == addrs  # the base list is whole
    assert any("impossible address" in w for w in warnings)


def test_rtld_global_route_with_hostile_values() -> None:
    """glibc < 2.35: no r_next, _rtld_global._dl_ns[i]._ns_loaded instead."""
    lay = GlibcLayout(file_id=968, source="test", ns_size=160, ns_debug=112, nns=2560)
    segs, addrs = chain(2)
    rg = 0x80000
    glob = bytearray(4096)
    struct.pack_into("<Q", glob, 0, addrs[0])                 # _dl_ns[0]._ns_loaded = r_map
    struct.pack_into("<Q", glob, 160, 0xffff_8000_0000_0000)  # _dl_ns[1]: a kernel pointer
    struct.pack_into("<Q", glob, 320, MAPS_AT + 5)            # _dl_ns[2]: misaligned
    for nns, expect_heads in ((3, 3), (10**9, 1), (0, 1)):
        struct.pack_into("<Q", glob, 2560, nns)
        mem = Image([(R_DEBUG, r_debug(r_map=addrs[0])), (rg, glob), *segs])
        with bounded():
            maps, warnings, _ = walk_all(mem, R_DEBUG, rg, lay)
        assert [m.addr for m in maps] == addrs
        assert len(warnings) == (2 if expect_heads == 3 else 1)
    # _dl_ns[0] disagreeing with r_map: only the base namespace.
    struct.pack_into("<Q", glob, 2560, 3)
    struct.pack_into("<Q", glob, 0, addrs[1])
    heads, warnings = find_namespaces(Image([(R_DEBUG, r_debug(r_map=addrs[0])), (rg, glob), *segs]),
                                      R_DEBUG, rg, lay)
    assert len(heads) == 1 and warnings
    # _rtld_global itself unmapped: a memory fault, not anything else.
    with bounded(), pytest.raises(MemoryFault):
        find_namespaces(Image([(R_DEBUG, r_debug(r_map=addrs[0])), *segs]), R_DEBUG, rg, lay)


# --- structure_scan ------------------------------------------------------------------

ROW = table.glibc_row("2.36", "x86_64")
assert ROW is not None
K = ROW.l_local_scope  # 952


def signed_map(addr: int, k: int = K, searchlist: int | None = None, scope_max: int = 4,
               scope: int | None = None) -> bytes:
    """A link_map carrying the l_local_scope signature at offset k."""
    raw = link_map(addr)
    rel = ROW.l_searchlist if searchlist is None else searchlist
    struct.pack_into("<QQQ", raw, k - 16, scope_max, addr + k - 48 if scope is None else scope, addr + rel)
    return bytes(raw)


def test_structure_scan_finds_an_agreed_offset() -> None:
    maps = [(a, signed_map(a)) for a in (MAPS_AT, MAPS_AT + MAP_SIZE, 0x5555_0000_1000)]
    assert structure_scan(maps) == K


@pytest.mark.parametrize("second", [
    lambda a: signed_map(a, k=K + 24, searchlist=ROW.l_searchlist + 24),  # another offset
    lambda a: signed_map(a, searchlist=ROW.l_searchlist - 8),            # another l_searchlist
    lambda a: bytes(link_map(a)),                                        # no signature at all
    lambda a: signed_map(a, scope=0x1234_5000),                          # l_scope not l_scope_mem
    lambda a: signed_map(a, scope_max=3),                                # l_scope_max < 4
    lambda a: signed_map(a, scope_max=1 << 40),                          # absurd l_scope_max
    lambda a: signed_map(a)[:K],                                         # the map is cut short
], ids=["other-offset", "other-searchlist", "no-signature", "scope-elsewhere", "scope-max-3",
        "scope-max-huge", "cut-short"])
def test_structure_scan_on_disagreeing_maps_returns_none(second: Callable[[int], bytes]) -> None:
    a, b = MAPS_AT, MAPS_AT + MAP_SIZE
    with bounded():
        assert structure_scan([(a, signed_map(a)), (b, second(b))]) is None
        assert structure_scan([(b, second(b)), (a, signed_map(a))]) is None


def test_structure_scan_needs_two_maps_and_a_unique_offset() -> None:
    assert structure_scan([(MAPS_AT, signed_map(MAPS_AT))]) is None
    assert structure_scan([]) is None
    # Two signatures on every map: ambiguous, so None.
    def twice(a: int) -> bytes:
        raw = bytearray(signed_map(a))
        struct.pack_into("<QQQ", raw, K + 80 - 16, 4, a + K + 80 - 48, a + ROW.l_searchlist)
        return bytes(raw)
    assert structure_scan([(a, twice(a)) for a in (MAPS_AT, MAPS_AT + MAP_SIZE)]) is None


def test_structure_scan_over_max_objects_maps_is_bounded() -> None:
    addrs = [MAPS_AT + i * MAP_SIZE for i in range(MAX_OBJECTS)]
    maps = [(a, signed_map(a)) for a in addrs]
    with bounded(0.5):
        assert structure_scan(maps) == K
    maps[-1] = (addrs[-1], signed_map(addrs[-1], k=K + 8, searchlist=ROW.l_searchlist + 8))
    with bounded(0.5):
        assert structure_scan(maps) is None


# --- ELF headers and notes in memory ------------------------------------------------------

IMG = 0x5000_0000  # where crafted ELF images are mapped


def note(*, name: bytes = b"GNU\0", desc: bytes = b"", ntype: int = elf.NT_GNU_BUILD_ID,
         namesz: int | None = None, descsz: int | None = None) -> bytes:
    pad = lambda b: b + b"\0" * (-len(b) % 4)
    return (struct.pack("<III", len(name) if namesz is None else namesz,
                        len(desc) if descsz is None else descsz, ntype) + pad(name) + pad(desc))


def elf_image(*, notes: bytes = b"", ei_class: int = 2, ei_data: int = 1, phentsize: int = 56,
              phoff: int = 64, phnum: int | None = None, note_vaddr: int = 0x200,
              note_filesz: int | None = None, vaddr: int = 0, size: int = 0x1000) -> bytearray:
    """A shared object's first page: ELF header, PT_LOAD + PT_NOTE, the notes at 0x200."""
    img = bytearray(size)
    img[:7] = b"\x7fELF" + bytes([ei_class, ei_data, 1])
    phdrs = [(elf.PT_LOAD, 0, vaddr, size), (elf.PT_NOTE, 0x200, vaddr + note_vaddr,
                                             len(notes) if note_filesz is None else note_filesz)]
    struct.pack_into("<HHIQQQIHHHHHH", img, 16, 3, 62, 1, 0, phoff, 0, 0, 64, phentsize,
                     len(phdrs) if phnum is None else phnum, 64, 0, 0)
    for i, (p_type, off, va, filesz) in enumerate(phdrs):
        if 64 + (i + 1) * 56 <= len(img):
            struct.pack_into("<IIQQQQQQ", img, 64 + i * 56, p_type, 4, off, va, va, filesz, filesz, 8)
    img[0x200:0x200 + len(notes)] = notes
    return img


BID = bytes(range(1, 21))


def test_image_facts_on_a_good_image_finds_its_build_id() -> None:
    mem = Image([(IMG, elf_image(notes=note(desc=BID)))])
    (img,) = image_facts(mem, [(IMG, IMG)])
    assert img is not None and img.build_id == BID and img.header[:4] == b"\x7fELF"


GARBAGE_HEADERS: dict[str, bytes | bytearray] = {
    "zeros": bytes(4096),
    "random": bytes((i * 131 + 7) & 0xFF for i in range(4096)),
    "magic-only": b"\x7fELF" + bytes(60),
    "elf32": elf_image(ei_class=1),
    "big-endian": elf_image(ei_data=2),
    "phnum-65535": elf_image(phnum=0xFFFF),
    "phnum-257": elf_image(phnum=elf.MAX_PHNUM + 1),
    "phentsize-32": elf_image(phentsize=32),
    "phoff-top-of-space": elf_image(phoff=(1 << 64) - 8),
    "phoff-unmapped": elf_image(phoff=0x10_0000),
    "phdrs-cut-by-the-mapping": elf_image(phnum=40, size=0x400),
    "header-cut-short": b"\x7fELF\x02\x01\x01" + bytes(20),
}


@pytest.mark.parametrize("name", list(GARBAGE_HEADERS))
def test_image_facts_on_garbage_elf_headers(name: str) -> None:
    good = IMG + 0x100_0000
    mem = Image([(IMG, GARBAGE_HEADERS[name]), (good, elf_image(notes=note(desc=BID)))])
    with bounded():
        out = image_facts(mem, [(IMG, IMG), (good, good), (IMG, 0), (IMG, UNMAPPED),
                                (IMG, (1 << 64) - 32)])
    assert len(out) == 5
    assert out[0] is None and out[2:] == [None, None, None]
    assert out[1] is not None and out[1].build_id == BID  # its neighbours do not spoil it
    facts = FileFacts(FileId(1, 2), 4096, BID, bytes(GARBAGE_HEADERS[name][:64]))
    assert same_content(out[0], facts)[0] is None  # undecided, so never "same"
    mem.assert_untouched()


NOTE_CASES: dict[str, dict[str, object]] = {
    "filesz-2**63": {"notes": note(desc=BID), "note_filesz": 1 << 63},
    "filesz-above-NOTE_MAX": {"notes": note(desc=BID), "note_filesz": elf.NOTE_MAX + 1, "size": 0x3000},
    "namesz-4G": {"notes": note(desc=BID, namesz=0xFFFF_FFFF)},
    "descsz-4G": {"notes": note(desc=BID, descsz=0xFFFF_FFFF)},
    "descsz-1025": {"notes": note(desc=bytes(1025))},
    "desc-past-the-segment": {"notes": note(desc=BID, descsz=400), "note_filesz": 60},
    "note-unmapped": {"notes": note(desc=BID), "note_vaddr": 0x10_0000},
    "note-at-top-of-space": {"notes": note(desc=BID), "note_vaddr": (1 << 64) - 0x10},
    "empty-notes-forever": {"notes": note(name=b"", ntype=1) * 0x300, "size": 0x3000},
    "not-gnu": {"notes": note(name=b"GNX\0", desc=BID)},
}


@pytest.mark.parametrize("name", list(NOTE_CASES))
def test_note_segment_with_absurd_sizes(name: str) -> None:
    mem = Image([(IMG, elf_image(**NOTE_CASES[name]))])  # type: ignore[arg-type]
    with bounded():
        (img,) = image_facts(mem, [(IMG, IMG)])
    assert img is not None and img.build_id is None  # headers fine, no build-id believed
    facts = FileFacts(FileId(1, 2), 4096, BID, img.header)
    assert same_content(img, facts) == (False, "build-id present on one side only")
    mem.assert_untouched()


def test_negative_load_bias_wraps_like_the_loader() -> None:
    """A prelinked object mapped below its link-time address has l_addr < 0 (mod 2**64)."""
    link_time = IMG + 0x10_0000
    mem = Image([(IMG, elf_image(notes=note(desc=BID), vaddr=link_time))])
    bias = (IMG - link_time) & MASK64
    with bounded():
        (img,) = image_facts(mem, [(bias, IMG)])
    assert img is not None and img.build_id == BID


@given(st.binary(max_size=600))
@settings(max_examples=200, derandomize=True, database=None, deadline=None)
def test_note_parser_on_random_bytes(data: bytes) -> None:
    with bounded():
        bid = elf.build_id_from_notes(data)
    assert bid is None or len(bid) <= 1024


@given(st.binary(min_size=0, max_size=700), st.integers(0, 8))
@settings(max_examples=200, derandomize=True, database=None, deadline=None)
def test_elf_parsers_raise_only_corrupt_target(data: bytes, count: int) -> None:
    with bounded():
        for parse in (elf.parse_ehdr, lambda d: elf.parse_phdrs(d, count), elf.parse_dynamic):
            try:
                parse(data)
            except CorruptTarget:
                pass
        mem = Image([(IMG, data)] if data else [])
        out = image_facts(mem, [(IMG, IMG), (0, 0)])
    assert len(out) == 2 and out[1] is None
    assert out[0] is None or isinstance(out[0], ImageFacts)


# --- ELF files with absurd notes and string tables ----------------------------------------

def test_file_facts_on_a_file_with_absurd_notes(tmp_path: Path) -> None:
    img = elf_image(notes=note(desc=BID))
    struct.pack_into("<Q", img, 64 + 56 + 8, 1 << 40)  # PT_NOTE p_offset far past the end
    p = tmp_path / "lib.so"
    p.write_bytes(bytes(img))
    fd = os.open(p, os.O_RDONLY)
    try:
        with bounded():
            with pytest.raises(CorruptTarget):
                elf.ElfFile(fd, len(img)).build_id()
            facts = file_facts(fd, FileId(1, 2), len(img))
    finally:
        os.close(fd)
    assert facts.build_id is None and facts.id == FileId(1, 2)


def test_dynamic_symbol_needs_a_terminated_name(tmp_path: Path) -> None:
    """A name that runs off the end of .dynstr is not a name (it used to match
    with its last byte cut off)."""

    def lib(strtab: bytes) -> bytes:
        syms = bytes(24) + struct.pack("<IBBHQQ", 1, 0x11, 0, 7, 0x4000, 8)
        body = bytearray(0x200)
        body[0x100:0x100 + len(syms)] = syms
        body[0x180:0x180 + len(strtab)] = strtab
        shdrs = bytes(64)
        shdrs += struct.pack("<IIQQQQIIQQ", 0, 11, 0, 0, 0x100, len(syms), 2, 1, 8, 24)      # .dynsym
        shdrs += struct.pack("<IIQQQQIIQQ", 0, 3, 0, 0, 0x180, len(strtab), 0, 0, 1, 0)      # .dynstr
        hdr = bytearray(64)
        hdr[:7] = b"\x7fELF\x02\x01\x01"
        struct.pack_into("<HHIQQQIHHHHHH", hdr, 16, 3, 62, 1, 0, 0, 0x200, 0, 64, 56, 0, 64, 3, 0)
        return bytes(hdr + body[64:] + shdrs)

    for strtab, found in ((b"\0_rtld_global\0", True), (b"\0_rtld_globalX", False)):
        p = tmp_path / "ld.so"
        p.write_bytes(lib(strtab))
        fd = os.open(p, os.O_RDONLY)
        try:
            got = elf.ElfFile(fd, p.stat().st_size).dynamic_symbol(b"_rtld_global")
        finally:
            os.close(fd)
        assert (got == (0x4000, 8)) if found else (got is None), strtab


# --- the memory readers refuse and fault alike ----------------------------------------------

def test_image_memory_refuses_what_process_memory_refuses() -> None:
    mem = Image([(IMG, bytes(64))])
    for size in (-1, MAX_READ + 1):
        with pytest.raises(MemoryFault):
            mem.read_many([(IMG, size)])
    assert mem.read_many([(IMG, 8), ((1 << 64) - 4, 8), (-8, 8)]) == [bytes(8), b"", b""]
    for addr in (0, -8, (1 << 64) - 4):
        with pytest.raises(MemoryFault):
            read(mem, addr, 8)


def test_process_memory_wild_address_faults_one_region_only() -> None:
    """The live reader: one wild pointer must not fail the whole batch."""
    buf = ctypes.create_string_buffer(b"/usr/lib/libz.so.1")
    try:
        mem = ProcessMemory(os.getpid())
    except LdfixError as exc:
        pytest.skip(f"cannot open our own /proc/PID/mem: {exc}")
    try:
        addr = ctypes.addressof(buf)
        with bounded():
            got = mem.read_many([(addr, 8), ((1 << 64) - 16, 256), (0xffff_8000_0000_0000, 8),
                                 (1 << 64, 0), (-8, 8), (addr + 9, 7)])
        assert got == [b"/usr/lib", b"", b"", b"", b"", b"libz.so"]
        with pytest.raises(MemoryFault):
            mem.read_many([(addr, MAX_READ + 1)])
        # And through the walker: a kernel l_name among good ones.
        maps = [RawMap(0x1000, bytes(link_map(0x1000, name=addr)), 0),
                RawMap(0x2000, bytes(link_map(0x2000, name=(1 << 64) - 16)), 0),
                RawMap(0x3000, bytes(link_map(0x3000, name=0xffff_8000_0000_0000)), 0)]
        with bounded():
            names = _read_names(mem, maps)
        assert names[0x1000] == b"/usr/lib/libz.so.1"
        assert not names[0x2000].startswith(b"/") and not names[0x3000].startswith(b"/")
    finally:
        mem.close()


# --- property tests: mutations and random bytes never escape as anything else --------------

SMALL_RTLD = 0x90000
SMALL_LAYOUT = GlibcLayout(file_id=968, source="test", ns_size=160, ns_debug=112, nns=2560)


def small_image(version: int) -> list[tuple[int, bytearray]]:
    """Two namespaces (3 + 2 maps), both routes to the second: r_next, _rtld_global."""
    segs, addrs = chain(3, at=MAPS_AT, names_at=NAMES_AT)
    segs2, addrs2 = chain(2, at=MAPS_AT + 0x4000, names_at=NAMES_AT + 0x1000)
    for a in addrs2:
        poke(segs2, a + L_NS, 1)
    dbg = bytearray(r_debug(version=version, r_map=addrs[0], r_next=R_DEBUG + 64)
                    + bytes(16) + r_debug(version=version, r_map=addrs2[0]))
    glob = bytearray(2600)
    struct.pack_into("<Q", glob, 0, addrs[0])
    struct.pack_into("<Q", glob, 160, addrs2[0])
    struct.pack_into("<Q", glob, 2560, 2)
    return [(R_DEBUG, dbg), (SMALL_RTLD, glob), *segs, *segs2]


INTERESTING = [0, 1, 2, 4, 0xFF, 1 << 31, (1 << 32) - 1, R_DEBUG, R_DEBUG + 64, MAPS_AT,
               MAPS_AT + MAP_SIZE, MAPS_AT + 2 * MAP_SIZE, MAPS_AT + 0x4000, MAPS_AT + 8, MAPS_AT + 3,
               NAMES_AT, NAMES_AT + 0xFFF, SMALL_RTLD, UNMAPPED, 1 << 47, *KERNEL, MASK64, 2560, 10**9]

mutation = st.tuples(st.integers(0, 10),                        # which segment (modulo)
                     st.integers(0, 1 << 16),                   # where in it (modulo its size)
                     st.one_of(st.sampled_from(INTERESTING), st.integers(0, MASK64)),
                     st.sampled_from([1, 4, 8]))                # how many bytes of the value


def check_walk(segs: Sequence[tuple[int, bytes | bytearray]], r_dbg: int, use_rtld: bool) -> None:
    """The property: finish in bounded time with a result or an LdfixError; a
    result keeps every bound."""
    mem = Image(segs)
    with bounded():
        try:
            maps, warnings, names = walk_all(mem, r_dbg, SMALL_RTLD if use_rtld else None,
                                             SMALL_LAYOUT if use_rtld else None)
        except LdfixError:
            mem.assert_untouched()
            return
    assert len(maps) <= MAX_OBJECTS
    assert all(isinstance(w, str) and w for w in warnings)
    for m in maps:
        assert m.addr % 8 == 0 and 0 < m.addr < 1 << 56
        assert 56 <= len(m.raw) <= WINDOW
    assert set(names) == {m.addr for m in maps}
    assert all(len(n) <= NAME_LIMIT + 32 for n in names.values())
    mem.assert_untouched()


def test_small_image_is_well_formed() -> None:
    """The base the mutations start from walks completely by either route."""
    for version, use_rtld in ((2, False), (1, True)):
        mem = Image(small_image(version))
        maps, warnings, names = walk_all(mem, R_DEBUG, SMALL_RTLD if use_rtld else None,
                                         SMALL_LAYOUT if use_rtld else None)
        assert len(maps) == 5 and warnings == []
        assert sorted(names.values()) == [b"", b"", b"/lib/lib1.so", b"/lib/lib1.so", b"/lib/lib2.so"]


@given(st.lists(mutation, min_size=1, max_size=8), st.sampled_from([1, 2]), st.booleans())
@settings(max_examples=200, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
def test_mutated_small_image_never_escapes(muts: list[tuple[int, int, int, int]], version: int,
                                            use_rtld: bool) -> None:
    segs = small_image(version)
    for which, where, value, width in muts:
        _start, buf = segs[which % len(segs)]
        off = where % max(1, len(buf) - width + 1)
        buf[off:off + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    check_walk(segs, R_DEBUG, use_rtld)


@given(st.lists(st.binary(min_size=0, max_size=1500), min_size=4, max_size=4), st.booleans())
@settings(max_examples=200, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
def test_random_bytes_never_escape(blobs: list[bytes], use_rtld: bool) -> None:
    at = (R_DEBUG, MAPS_AT, NAMES_AT, SMALL_RTLD)
    check_walk([(a, b) for a, b in zip(at, blobs) if b], R_DEBUG, use_rtld)


@given(st.lists(st.binary(min_size=0, max_size=WINDOW), min_size=2, max_size=4))
@settings(max_examples=200, derandomize=True, database=None, deadline=None)
def test_structure_scan_on_random_maps(raws: list[bytes]) -> None:
    with bounded():
        k = structure_scan([(MAPS_AT + i * MAP_SIZE, r) for i, r in enumerate(raws)])
    assert k is None or (560 <= k <= 1200 and k % 8 == 0)


# --- a whole GlibcBackend.analyse over a crafted target ---------------------------------------

class FakeProc:
    pid = 4242

    def readlink(self, what: str) -> str | None:
        return "/usr/bin/victim" if what == "exe" else None

    def map_file_path(self, m: Mapping) -> str:
        return "/nonexistent/map_files"


class FakeRoot:
    """The target's filesystem: every file missing, or `facts` of each name."""

    def __init__(self, facts: Callable[[bytes], FileFacts] | None = None) -> None:
        self._facts = facts
        self.asked: list[bytes] = []

    def facts(self, name: bytes) -> FileFacts:
        self.asked.append(name)
        if self._facts is None:
            raise FileProblem("no such file in the process's root", missing=True)
        return self._facts(name)

    def current_id(self, name: bytes) -> FileId:
        return self.facts(name).id

    def probe(self, name: bytes, stored: FileId) -> tuple[FileId, FileFacts | None]:
        f = self.facts(name)
        return f.id, (None if f.id == stored else f)

    def probe_many(self, names: list[bytes], stored: list[FileId] | None) -> list[Probe]:
        out = []
        for i, name in enumerate(names):
            try:
                f = self.facts(name)
            except FileProblem as exc:
                out.append(Probe(None, exc.reason, None))
                continue
            changed = stored is not None and f.id != stored[i]
            out.append(Probe(f.id, "", f.build_id if changed else None))
        return out

    def open_file(self, path: str) -> int | None:
        return None


def analyse(mem: Image, r_dbg: int, *, maps: list[Mapping] | None = None, version: str | None = None,
            root: FakeRoot | None = None) -> Inspection:
    view = TargetView(proc=FakeProc(), mem=mem, maps=maps or [], exe_bias=0, dynamic=[],  # type: ignore[arg-type]
                      interp_name=None, r_debug=r_dbg, interp=None)
    backend = GlibcBackend(view, "x86_64", [])
    backend.version = version  # as if read from the loader's banner
    with bounded():
        ins = backend.analyse(root or FakeRoot()).inspection  # type: ignore[arg-type]
    mem.assert_untouched()
    return ins


def test_analyse_100000_entry_list() -> None:
    segs, addrs = chain(100_000, stride=64, names=False)
    ins = analyse(Image([(R_DEBUG, r_debug(r_map=addrs[0])), *segs]), R_DEBUG)
    assert ins.partial and any("truncated" in w for w in ins.warnings)
    assert len(ins.objects) == MAX_OBJECTS
    assert all(o.status == Status.UNKNOWN and not o.writable for o in ins.objects)


def test_analyse_budget_is_shared_by_every_namespace() -> None:
    segs, addrs = chain(10_000, stride=64, names=False)
    segs2, addrs2 = chain(10_000, at=0x100_0000, stride=64, names=False)
    dbg = r_debug(version=2, r_map=addrs[0], r_next=R_DEBUG + 48) + r_debug(version=2, r_map=addrs2[0])
    ins = analyse(Image([(R_DEBUG, dbg), *segs, *segs2]), R_DEBUG)
    assert ins.partial and len(ins.objects) == MAX_OBJECTS
    assert {o.address for o in ins.objects} >= set(addrs)


def test_analyse_cycle_and_bad_names() -> None:
    segs, addrs = chain(4)
    poke(segs, addrs[3] + L_NEXT, addrs[1])
    poke(segs, addrs[1] + L_NAME, UNMAPPED)
    huge = 0x1000_0000
    segs.append((huge, bytearray(b"/" * (1 << 20))))
    poke(segs, addrs[2] + L_NAME, huge)
    root = FakeRoot()
    ins = analyse(Image([(R_DEBUG, r_debug(r_map=addrs[0])), *segs]), R_DEBUG, root=root)
    assert ins.partial and any("cycle" in w for w in ins.warnings)
    assert [o.address for o in ins.objects] == addrs
    assert all(o.status == Status.UNKNOWN for o in ins.objects)
    assert all(len(o.name) <= NAME_LIMIT + 32 for o in ins.objects)


def test_analyse_r_debug_unmapped() -> None:
    segs, _ = chain(2)
    mem = Image(segs)
    with pytest.raises(MemoryFault):
        analyse(mem, UNMAPPED)  # bounded inside
    mem.assert_untouched()


# A target whose layout verifies (structure + the 2.36 table row): the deep
# path runs, down to the file identity and the mapped image.

def verified_scene(*, image: Callable[[int], bytearray] | None = None,
                   mutate: Callable[[list[tuple[int, bytearray]], list[int]], None] | None = None,
                   ) -> tuple[Image, list[Mapping], list[int]]:
    """The program and two libraries, each link_map as glibc 2.36 x86_64 lays it
    out, each object's first page mapped, /proc/PID/maps to match."""
    segs, addrs = chain(3, names=False)
    buf = segs[0][1]
    names = bytearray(b"\0/usr/lib/libone.so\0/usr/lib/libtwo.so\0")
    name_ptrs = [NAMES_AT, NAMES_AT + 1, NAMES_AT + 20]
    maps: list[Mapping] = []
    images: list[tuple[int, bytearray]] = []
    for i, a in enumerate(addrs):
        start = IMG + i * 0x10_0000
        off = a - MAPS_AT
        buf[off:off + MAP_SIZE] = link_map(a, name=name_ptrs[i], nxt=addrs[i + 1] if i < 2 else 0,
                                           prev=addrs[i - 1] if i else 0, l_addr=start)
        struct.pack_into("<QQQ", buf, off + K - 16, 4, a + K - 48, a + ROW.l_searchlist)
        struct.pack_into("<Q", buf, off + ROW.l_phdr, start + 64)
        struct.pack_into("<H", buf, off + ROW.l_phnum, 2)
        struct.pack_into("<QQ", buf, off + ROW.l_map_start, start, start + 0x1000)
        if i:  # the libraries have a stored id; the program's stays zero
            struct.pack_into("<QQ", buf, off + ROW.file_id, 0xfe00, 340070 + i)
        maps.append(Mapping(start, start + 0x1000, "r--p", 0, 0xfe00, 340070 + i,
                            b"/usr/lib/lib%d.so" % i))
        images.append((start, (image or (lambda _i: elf_image(notes=note(desc=BID))))(i)))
    segs.append((NAMES_AT, names))
    if mutate:
        mutate(segs, addrs)
    mem = Image([(R_DEBUG, r_debug(r_map=addrs[0])), *segs, *images])
    return mem, maps, addrs


def new_id(name: bytes) -> FileFacts:
    """The file as it is after the restore: same content (BID), another id."""
    return FileFacts(FileId(0x2f, 91), 0x1000, BID, b"")


def test_analyse_baseline_reaches_a_writable_stale_object() -> None:
    """The control for the cases below: the crafted target is good enough to be repaired."""
    mem, maps, _ = verified_scene()
    ins = analyse(mem, R_DEBUG, maps=maps, version="2.36", root=FakeRoot(new_id))
    assert ins.loader.layout_source == "structure+table", ins.loader.layout_error
    assert [o.status for o in ins.objects] == [Status.UNSET, Status.STALE, Status.STALE]
    assert [o.writable for o in ins.objects] == [False, True, True]
    assert not ins.partial


@pytest.mark.parametrize("readable", [K + 8, ROW.file_id + 8])
def test_analyse_map_read_short_fails_the_cross_check(readable: int) -> None:
    """A link_map whose memory ends part way (a racing dlclose, a hostile
    target): the layout fails the cross-check and says why; no exception
    escapes, whatever the layout's fields the short read misses."""
    def cut(segs: list[tuple[int, bytearray]], addrs: list[int]) -> None:
        start, buf = segs[0]
        del buf[addrs[2] - start + readable:]
    mem, maps, _ = verified_scene(mutate=cut)
    ins = analyse(mem, R_DEBUG, maps=maps, version="2.36", root=FakeRoot(new_id))
    assert ins.loader.layout_source is None
    assert f"only {readable} bytes readable" in (ins.loader.layout_error or "")
    assert all(o.status is Status.UNKNOWN and not o.writable for o in ins.objects)


@pytest.mark.parametrize("image", [
    lambda i: elf_image(ei_class=1),
    lambda i: elf_image(phoff=(1 << 64) - 8),
    lambda i: elf_image(phentsize=32),
    lambda i: elf_image(notes=note(desc=BID), note_filesz=1 << 63),
    lambda i: elf_image(notes=note(desc=BID, namesz=0xFFFF_FFFF)),
    lambda i: elf_image(notes=note(desc=BID), note_vaddr=0x10_0000),
    lambda i: elf_image(notes=note(desc=bytes(20))),
], ids=["elf32", "phoff-top", "phentsize", "note-filesz-2**63", "note-namesz-4G", "note-unmapped",
        "other-build-id"])
def test_analyse_garbage_mapped_image_is_never_writable(image: Callable[[int], bytearray]) -> None:
    mem, maps, _ = verified_scene(image=image)
    ins = analyse(mem, R_DEBUG, maps=maps, version="2.36", root=FakeRoot(new_id))
    assert ins.loader.layout_source == "structure+table", ins.loader.layout_error
    libs = ins.objects[1:]
    assert [o.status for o in libs] == [Status.CHANGED, Status.CHANGED]
    assert not any(o.writable for o in ins.objects)


def test_analyse_missing_files_are_never_writable() -> None:
    mem, maps, _ = verified_scene()
    root = FakeRoot()  # facts() raises FileProblem for everything
    ins = analyse(mem, R_DEBUG, maps=maps, version="2.36", root=root)
    assert ins.loader.layout_source == "structure+table"
    assert [o.status for o in ins.objects] == [Status.UNSET, Status.MISSING, Status.MISSING]
    assert not any(o.writable for o in ins.objects)
    assert root.asked == [b"/usr/lib/libone.so", b"/usr/lib/libtwo.so"]


def _set(offset: int, *values: int, which: int = 1):  # type: ignore[no-untyped-def]
    def mutate(segs: list[tuple[int, bytearray]], addrs: list[int]) -> None:
        for i, value in enumerate(values):
            poke(segs, addrs[which] + offset + 8 * i, value)
    return mutate


@pytest.mark.parametrize("mutate", [
    _set(L_NS, 99),                                  # l_ns out of range
    _set(L_NS, 1),                                   # l_ns not the list's
    _set(ROW.l_map_start, IMG + 0x8000),             # not the start of a mapping
    _set(ROW.l_phnum, 7),                            # l_phnum disagrees with the ELF header
    _set(ROW.l_phdr, UNMAPPED),                      # l_phdr outside the object
    _set(L_LD, UNMAPPED),                            # l_ld outside the object
    _set(L_REAL, MAPS_AT + 0x100_0000),              # a "proxy" with a stored id
    _set(ROW.file_id, 0, 0),                         # a library without an id
    _set(K, 0, which=2),                             # the signature breaks on one map
], ids=["l_ns-99", "l_ns-1", "map-start", "phnum", "phdr", "l_ld", "proxy-with-id", "no-id",
        "no-signature"])
def test_analyse_cross_check_failures_leave_everything_unknown(mutate) -> None:  # type: ignore[no-untyped-def]
    mem, maps, _ = verified_scene(mutate=mutate)
    ins = analyse(mem, R_DEBUG, maps=maps, version="2.36", root=FakeRoot(new_id))
    assert ins.loader.layout_source is None and ins.loader.layout_error
    assert all(o.status == Status.UNKNOWN for o in ins.objects)
    assert not any(o.writable for o in ins.objects)


# --- the plan: no write outside the verified id fields (glibc, mutated verified scenes) --------
#
# Random words of a target that verifies (verified_scene: the program and two
# stale libraries) are overwritten; whatever the analysis makes of it, every
# address the repair would write is the id field (link_map + l_file_id) of a
# library map that passed the cross-check and that holds the planned old id,
# and a prepared swap on the image writes there and nowhere else.

from types import SimpleNamespace

from hypothesis import event

from ldfix.memory import swap16
from ldfix.repair import _plan


def _scene_targets(addrs: list[int]) -> list[int]:
    """Interesting values for the mutations: every field address of the scene."""
    out = [0, 1, 4, MASK64, UNMAPPED, IMG, IMG + 0x1000, IMG + 0x10_0000, NAMES_AT, NAMES_AT + 1,
           R_DEBUG, 0xfe00, 340071, 0x2f, 91]
    for a in addrs:
        out += [a, a + 8, a + K - 48, a + ROW.l_searchlist, a + ROW.file_id]
    return out


SCENE_ADDRS = [MAPS_AT + i * MAP_SIZE for i in range(3)]
scene_mutation = st.tuples(st.integers(0, 1 << 20),                       # which segment (modulo)
                           st.sampled_from([L_NAME, L_LD, L_NEXT, L_PREV, L_REAL, L_NS, ROW.l_phdr,
                                            ROW.l_phnum, ROW.l_map_start, ROW.l_map_end, K - 16, K - 8,
                                            K, ROW.file_id, ROW.file_id + 8, None]),
                           st.integers(0, 1 << 16),                       # where, when not a field
                           st.one_of(st.sampled_from(_scene_targets(SCENE_ADDRS)), st.integers(0, MASK64)),
                           st.sampled_from([1, 2, 8]))


def check_plan_is_confined(mem: Image, ins: Inspection) -> list[int]:
    """The property; returns the planned addresses."""
    try:
        plan, _skipped = _plan(SimpleNamespace(inspection=ins))  # type: ignore[arg-type]
    except LdfixError:
        return []
    by_addr = {o.address: o for o in ins.objects}
    allowed = set()
    for o in ins.objects:
        if not o.writable:
            continue
        assert o.role == "library" and o.status == Status.STALE
        assert o.id_address == o.address + ROW.file_id
        head = mem.read_many([(o.address, 56)])[0]
        assert int.from_bytes(head[L_REAL:L_REAL + 8], "little") == o.address  # l_real: itself
        allowed.add(o.id_address)
    planned = [rw.address for rw in plan]
    assert set(planned) <= allowed
    for rw in plan:
        owner = by_addr[rw.address - ROW.file_id]
        assert mem.read_many([(rw.address, 16)])[0] == rw.old.pack() == owner.stored.pack()
    if plan:
        outcome = swap16(mem, planned, [rw.old.pack() for rw in plan], [rw.new.pack() for rw in plan])()
        assert outcome == ("ok", -1)
        assert {a for a, _ in mem.write_attempts} == set(planned)
        assert all(len(d) == 16 for _, d in mem.write_attempts)
    return planned


@given(st.lists(scene_mutation, min_size=1, max_size=6))
@settings(max_examples=int(os.environ.get("LDFIX_HOSTILE_EXAMPLES", "300")), derandomize=True,
          database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_verified_scene_plans_only_verified_id_fields(muts) -> None:  # type: ignore[no-untyped-def]
    def mutate(segs: list[tuple[int, bytearray]], addrs: list[int]) -> None:
        for which, field_off, where, value, width in muts:
            if field_off is not None:
                poke(segs, addrs[which % len(addrs)] + field_off, value if width == 8 else value & 0xFFFF)
                continue
            _start, buf = segs[which % len(segs)]
            off = where % max(1, len(buf) - width + 1)
            buf[off:off + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    mem, maps, _ = verified_scene(mutate=mutate)
    view = TargetView(proc=FakeProc(), mem=mem, maps=maps, exe_bias=0, dynamic=[],  # type: ignore[arg-type]
                      interp_name=None, r_debug=R_DEBUG, interp=None)
    backend = GlibcBackend(view, "x86_64", [])
    backend.version = "2.36"
    with bounded():
        try:
            ins = backend.analyse(FakeRoot(new_id)).inspection  # type: ignore[arg-type]
        except LdfixError as exc:
            event(f"analyse: {type(exc).__name__}")
            mem.assert_untouched()
            return
        mem.assert_untouched()  # analysing writes nothing
        planned = check_plan_is_confined(mem, ins)
    event(f"layout {'verified' if ins.loader.layout_source else 'refused'}, {len(planned)} id(s) planned")


def test_unmutated_verified_scene_plans_both_libraries() -> None:
    """The control for the property: without mutations both stale ids are planned."""
    mem, maps, addrs = verified_scene()
    ins = analyse(mem, R_DEBUG, maps=maps, version="2.36", root=FakeRoot(new_id))
    assert sorted(check_plan_is_confined(mem, ins)) == [a + ROW.file_id for a in addrs[1:]]


# --- musl: crafted dso chains ----------------------------------------------------------------

from ldfix.loaders import musl as musl_loader

DSO_AT = 0x20000
DSO_SIZE = musl_loader.WINDOW + 64   # 432, a multiple of 8


def dso(addr: int, *, name: int = 0, nxt: int = 0, prev: int = 0, base: int = 0, dynv: int = 0,
        phdr: int = 0, phnum: int = 0, map_start: int = 0, map_len: int = 0, dev: int = 0,
        ino: int = 0) -> bytearray:
    raw = bytearray(DSO_SIZE)
    struct.pack_into("<6QH", raw, 0, base, name, dynv, nxt, prev, phdr, phnum)
    struct.pack_into("<4Q", raw, musl_loader.TABLE_MAP, map_start, map_len, dev, ino)
    return raw


def musl_scene(mutate: Callable[[list[tuple[int, bytearray]], list[int]], None] | None = None,
               ) -> tuple[Image, list[Mapping], list[int], int]:
    """musl's debug struct, the program's dso and two libraries (stale ids),
    each library's first page mapped and listed in /proc/PID/maps."""
    addrs = [DSO_AT + i * DSO_SIZE for i in range(3)]
    buf = bytearray(3 * DSO_SIZE)
    names = bytearray(b"/bin/prog\0/lib/libone.so\0/lib/libtwo.so\0")
    name_ptrs = [NAMES_AT, NAMES_AT + 10, NAMES_AT + 25]
    maps: list[Mapping] = []
    images: list[tuple[int, bytearray]] = []
    for i, a in enumerate(addrs):
        start = IMG + i * 0x10_0000
        lib = i > 0
        buf[i * DSO_SIZE:(i + 1) * DSO_SIZE] = dso(
            a, name=name_ptrs[i], nxt=addrs[i + 1] if i < 2 else 0, prev=addrs[i - 1] if i else 0,
            base=start, dynv=start + 0x800, phdr=start + 64, phnum=2, map_start=start, map_len=0x1000,
            dev=0xfe00 if lib else 0, ino=340070 + i if lib else 0)
        maps.append(Mapping(start, start + 0x1000, "r--p", 0, 0xfe00, 340070 + i, name_ptrs and b"/x%d" % i))
        images.append((start, elf_image(notes=note(desc=BID))))
    segs = [(DSO_AT, buf), (NAMES_AT, names)]
    if mutate:
        mutate(segs, addrs)
    debug = struct.pack("<i4xQQi4xQ", 1, addrs[0], 0, 0, 0)
    return Image([(R_DEBUG, debug), *segs, *images]), maps, addrs, R_DEBUG


def musl_analyse(mem: Image, maps: list[Mapping], r_dbg: int, root: FakeRoot | None = None) -> Inspection:
    view = TargetView(proc=FakeProc(), mem=mem, maps=maps, exe_bias=0, dynamic=[],  # type: ignore[arg-type]
                      interp_name=None, r_debug=r_dbg, interp=None)
    backend = object.__new__(musl_loader.MuslBackend)   # skips reading the loader file for its version
    backend.view, backend.arch, backend.warnings = view, "x86_64", []
    backend.version, backend.version_how = "1.2.5", "test"
    with bounded():
        return backend.analyse(root or FakeRoot(new_id)).inspection  # type: ignore[arg-type]


def test_musl_scene_baseline_is_writable() -> None:
    mem, maps, addrs, r_dbg = musl_scene()
    dsos, problem = musl_loader.walk(mem, addrs[0])
    assert problem is None and [d.addr for d in dsos] == addrs
    starts = {a: IMG + i * 0x10_0000 for i, a in enumerate(addrs)}
    assert musl_loader.structure_map_offset(dsos[1:], starts) == musl_loader.TABLE_MAP
    ins = musl_analyse(mem, maps, r_dbg)
    assert ins.loader.layout_source == "structure+table", ins.loader.layout_error
    assert [o.status for o in ins.objects] == [Status.UNSET, Status.STALE, Status.STALE]
    assert [o.id_address for o in ins.objects if o.writable] == [a + musl_loader.TABLE_DEV for a in addrs[1:]]
    mem.assert_untouched()


MUSL_INTERESTING = [0, 1, 2, 8, MASK64, UNMAPPED, *KERNEL, IMG, IMG + 64, IMG + 0x800, IMG + 0x10_0000,
                    NAMES_AT, DSO_AT, DSO_AT + 8, DSO_AT + DSO_SIZE, DSO_AT + 2 * DSO_SIZE, DSO_AT + 3,
                    0x1000, 1 << 40, 0xfe00]
musl_mutation = st.tuples(st.integers(0, 2), st.integers(0, DSO_SIZE // 8 - 1),
                          st.one_of(st.sampled_from(MUSL_INTERESTING), st.integers(0, MASK64)))


@given(st.lists(musl_mutation, min_size=1, max_size=8))
@settings(max_examples=int(os.environ.get("LDFIX_HOSTILE_EXAMPLES", "300")), derandomize=True,
          database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_musl_chain_never_escapes(muts: list[tuple[int, int, int]]) -> None:
    """Mutated dso words: the walk and the structure scan stay bounded; the
    analysis ends with a result or an LdfixError; a library is writable only
    at its own dev/ino field, having passed the cross-check."""
    def mutate(segs: list[tuple[int, bytearray]], addrs: list[int]) -> None:
        for which, word, value in muts:
            poke(segs, addrs[which] + 8 * word, value)
    mem, maps, addrs, r_dbg = musl_scene(mutate)
    with bounded():
        dsos, problem = musl_loader.walk(mem, addrs[0])
        k = musl_loader.structure_map_offset(dsos, {d.addr: IMG for d in dsos})
    assert len(dsos) <= musl_loader.MAX_OBJECTS and (problem is None or isinstance(problem, str))
    assert all(d.addr % 8 == 0 and 0 < d.addr < 1 << 56 and len(d.raw) >= 56 for d in dsos)
    assert k is None or (64 <= k < 320 and k % 8 == 0)
    try:
        ins = musl_analyse(mem, maps, r_dbg)
    except LdfixError as exc:
        event(f"analyse: {type(exc).__name__}")
        mem.assert_untouched()
        return
    mem.assert_untouched()
    event(f"layout {'verified' if ins.loader.layout_source else 'refused'}, "
          f"{sum(o.writable for o in ins.objects)} writable")
    for o in ins.objects:
        if o.writable:
            assert o.role == "library" and o.status == Status.STALE
            assert o.id_address == o.address + musl_loader.TABLE_DEV
            raw = mem.read_many([(o.address, musl_loader.WINDOW)])[0]
            assert FileId.unpack(raw[musl_loader.TABLE_DEV:musl_loader.TABLE_DEV + 16]) == o.stored
            mstart = int.from_bytes(raw[musl_loader.TABLE_MAP:musl_loader.TABLE_MAP + 8], "little")
            assert mstart in {m.start for m in maps}
    try:
        plan, _ = _plan(SimpleNamespace(inspection=ins))  # type: ignore[arg-type]
    except LdfixError:
        return
    assert {rw.address for rw in plan} <= {o.id_address for o in ins.objects if o.writable}


@given(st.lists(st.binary(min_size=0, max_size=DSO_SIZE), min_size=1, max_size=4), st.integers(0, 3))
@settings(max_examples=200, derandomize=True, database=None, deadline=None)
def test_musl_walk_on_random_bytes(raws: list[bytes], head: int) -> None:
    segs = [(DSO_AT + i * 0x1000, r) for i, r in enumerate(raws) if r]
    mem = Image(segs)
    with bounded():
        dsos, problem = musl_loader.walk(mem, DSO_AT + head * 0x1000)
        k = musl_loader.structure_map_offset(dsos, {d.addr: IMG for d in dsos})
    assert all(len(d.raw) >= 56 for d in dsos)
    assert len(dsos) <= sum(max(0, (len(r) - 56) // 8 + 1) for r in raws)  # each node at most once
    for prev, cur in zip([0] + [d.addr for d in dsos], dsos):
        assert int.from_bytes(cur.raw[musl_loader.PREV:musl_loader.PREV + 8], "little") == prev
    assert problem is None or isinstance(problem, str)
    assert k is None or 64 <= k < 320
    mem.assert_untouched()
