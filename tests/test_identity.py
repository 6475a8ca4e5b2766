"""Is the file at the path now the one that is mapped?  The judgement behind
every write: build-ids where both sides have one, the whole file's bytes
where neither has; and the native readers agree with the Python ones."""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ldfix
from helpers import FIXTURE_SRC, Fixtures, Target, ldfix as run_ldfix, replace_with_copy
from ldfix import native
from ldfix.identity import file_facts, image_facts
from ldfix.memory import ProcessMemory
from ldfix.model import FileId, LoadedObject, Status
from test_hostile_images import BID, GARBAGE_HEADERS, NOTE_CASES, elf_image, note


# --- real processes, libraries without a build-id -----------------------------------------

@pytest.fixture(scope="module")
def no_bid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The demo library twice, built without a build-id: the two builds
    differ in one byte of .rodata, past the first page."""
    d = tmp_path_factory.mktemp("nobid")
    out = []
    for variant in (1, 2):
        lib = d / f"v{variant}.so"
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-Wl,--build-id=none",
                        "-Wl,-soname,libldfix_demo.so", f"-DLDFIX_DEMO_VARIANT={variant}",
                        "-o", str(lib), str(FIXTURE_SRC / "libdemo.c")], check=True)
        out.append(lib)
    v1, v2 = out
    a, b = v1.read_bytes(), v2.read_bytes()
    assert len(a) == len(b) and a[:4096] == b[:4096] and a != b, "the builds must differ past page 1"
    return v1, v2


def _record(pid: int, lib: Path) -> LoadedObject:
    (o,) = [o for o in ldfix.inspect(pid).objects if o.name == os.fsencode(lib)]
    return o


def test_no_build_id_and_other_bytes_is_changed(fx: Fixtures, no_bid: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    """Same headers, same first page, one byte differs further on: never `stale`
    (headers and a first page used to be judged enough)."""
    v1, v2 = no_bid
    lib = tmp_path / "libnb.so"
    shutil.copy2(v1, lib)
    with Target([str(fx.target)]) as t:
        t.open(lib)
        os.link(lib, tmp_path / "keep")   # the mapped inode stays reachable by name too
        shutil.copy2(v2, tmp_path / "new.so")
        os.rename(tmp_path / "new.so", lib)
        o = _record(t.pid, lib)
        assert o.status == Status.CHANGED and not o.writable
        assert o.reason == "no build-id; the file's bytes differ from the mapped file's"
        doc = json.loads(run_ldfix("fix", "--json", str(t.pid)).stdout)
        assert doc["processes"][0]["rewritten"] == []


def test_no_build_id_identical_copy_is_repaired(fx: Fixtures, no_bid: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    lib = tmp_path / "libnb.so"
    shutil.copy2(no_bid[0], lib)
    with Target([str(fx.target)]) as t:
        first = t.open(lib)
        replace_with_copy(lib)
        o = _record(t.pid, lib)
        assert o.status == Status.STALE and o.writable
        assert o.reason == "new id, no build-id; byte-identical to the mapped file"
        res = run_ldfix("fix", "--json", str(t.pid))
        assert res.returncode == 0, res.stderr
        assert [r["name"] for r in json.loads(res.stdout)["processes"][0]["rewritten"]] == [str(lib)]
        link = tmp_path / "alias.so"
        link.symlink_to(lib)
        assert t.open(link).handle == first.handle


def test_no_build_id_and_no_mapped_file_is_left_alone(fx: Fixtures, no_bid: tuple[Path, Path],
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Without /proc/PID/map_files (no CAP_SYS_ADMIN) nothing can show the bytes match."""
    from ldfix.target import TargetView

    lib = tmp_path / "libnb.so"
    shutil.copy2(no_bid[0], lib)
    monkeypatch.setattr(TargetView, "open_mapped", lambda self, addr: None)
    with Target([str(fx.target)]) as t:
        t.open(lib)
        replace_with_copy(lib)
        o = _record(t.pid, lib)
        assert o.status == Status.CHANGED and not o.writable
        assert o.reason == "no build-id, and the mapped file cannot be opened to compare its bytes"


def test_build_id_decides_on_the_fast_path(fx: Fixtures, libdir: Path) -> None:
    lib = libdir / "libldfix_demo.so"
    with Target([str(fx.target)]) as t:
        t.open(lib)
        replace_with_copy(lib)
        o = _record(t.pid, lib)
        assert (o.status, o.reason) == (Status.STALE, "new id, same build-id")
        shutil.copy2(fx.lib_v2, libdir / "v2.so")
        os.rename(libdir / "v2.so", lib)
        o = _record(t.pid, lib)
        assert (o.status, o.reason) == (Status.CHANGED, "build-id differs")


# --- the native build-id readers against the Python ones ----------------------------------

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


@pytest.fixture
def arena() -> Iterator[int]:
    """8 MiB of this process's address space, inaccessible but for what each
    test maps readable at its start: crafted images in real memory."""
    size = 8 << 20
    addr = _libc.mmap(None, size, 0, 0x22, -1, 0)  # PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS
    assert addr not in (None, ctypes.c_void_p(-1).value)
    try:
        yield addr
    finally:
        _libc.munmap(addr, size)


def _place(arena: int, data: bytes) -> None:
    n = max(PAGE, -(-len(data) // PAGE) * PAGE)
    got = _libc.mmap(arena, n, 3, 0x32, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS|FIXED
    assert got == arena
    ctypes.memmove(arena, data, len(data))


def _both(regions: list[tuple[int, int]]) -> tuple[list[bytes | None], list[bytes | None]]:
    pid = os.getpid()
    mem = ProcessMemory(pid)
    try:
        fast = native.image_build_ids(pid, -1, regions)
        slow = [None if f is None else f.build_id for f in image_facts(mem, regions)]
    finally:
        mem.close()
    return fast, slow


def _agree(fast: list[bytes | None], slow: list[bytes | None]) -> None:
    """The native reader decides only what the Python one would decide the same way."""
    for f, s in zip(fast, slow, strict=True):
        assert f is None or f == s, (f, s)


IMAGES = {**{f"garbage-{k}": bytes(v) for k, v in GARBAGE_HEADERS.items()},
          **{f"notes-{k}": bytes(elf_image(**v)) for k, v in NOTE_CASES.items()},  # type: ignore[arg-type]
          "good": bytes(elf_image(notes=note(desc=BID))),
          "good-after-other-notes": bytes(elf_image(notes=note(name=b"X\0", ntype=7, desc=b"abcd")
                                                    + note(desc=BID))),
          "long-build-id": bytes(elf_image(notes=note(desc=bytes(range(100))))),
          "empty-build-id-then-good": bytes(elf_image(notes=note(desc=b"") + note(desc=BID)))}


@pytest.mark.parametrize("name", list(IMAGES))
def test_native_image_reader_agrees(arena: int, name: str) -> None:
    _place(arena, IMAGES[name])
    top = (1 << 64) - 32
    fast, slow = _both([(arena, arena), (0, 0), (arena, top), (top, arena)])
    _agree(fast, slow)
    if name in ("good", "good-after-other-notes"):
        assert fast[0] == BID
    if name in ("long-build-id",):
        assert fast[0] is None and slow[0] == bytes(range(100))  # longer than 64: left to Python


def test_native_image_reader_in_chunks(arena: int) -> None:
    """More images than one chunk (256), good and bad interleaved, and the
    same image many times."""
    _place(arena, IMAGES["good"])
    regions = [(arena, arena) if i % 3 else (arena + PAGE, arena + PAGE) for i in range(700)]
    fast, slow = _both(regions)
    _agree(fast, slow)
    assert fast == [BID if i % 3 else None for i in range(700)]


@given(st.binary(min_size=0, max_size=3 * 4096))
@settings(max_examples=150, derandomize=True, database=None, deadline=None)
def test_native_image_reader_on_random_bytes(data: bytes) -> None:
    size = 4 << 20
    addr = _libc.mmap(None, size, 0, 0x22, -1, 0)
    try:
        _place(addr, data)
        _agree(*_both([(addr, addr), (addr - 64, addr)]))
    finally:
        _libc.munmap(addr, size)


def _probe_file(root: Path, rel: bytes, stored: tuple[int, int] | None = (0, 0)):  # type: ignore[no-untyped-def]
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        return native.probe_files(rootfd, [rel], None if stored is None else [stored])[0]
    finally:
        os.close(rootfd)


@pytest.mark.parametrize("name", list(IMAGES))
def test_native_file_reader_agrees(tmp_path: Path, name: str) -> None:
    p = tmp_path / "lib.so"
    p.write_bytes(IMAGES[name])
    err, open_err, dev, ino, bid = _probe_file(tmp_path, b"/lib.so")
    st = os.stat(p)
    assert (err, open_err, dev, ino) == (0, 0, st.st_dev, st.st_ino)
    fd = os.open(p, os.O_RDONLY)
    try:
        want = file_facts(fd, FileId(st.st_dev, st.st_ino), st.st_size).build_id
    finally:
        os.close(fd)
    assert bid is None or bid == want
    if name in ("good", "good-after-other-notes"):
        assert bid == BID


@given(st.binary(min_size=0, max_size=2 * 4096))
@settings(max_examples=100, derandomize=True, database=None, deadline=None)
def test_native_file_reader_on_random_bytes(data: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f"
        p.write_bytes(data)
        *_, bid = _probe_file(Path(d), b"f")
        fd = os.open(p, os.O_RDONLY)
        try:
            want = file_facts(fd, FileId(0, 0), len(data)).build_id
        finally:
            os.close(fd)
        assert bid is None or bid == want


def test_native_file_reader_reads_only_what_it_must(tmp_path: Path) -> None:
    p = tmp_path / "lib.so"
    p.write_bytes(IMAGES["good"])
    st = os.stat(p)
    assert _probe_file(tmp_path, b"lib.so", None)[4] is None                      # no stored id given
    assert _probe_file(tmp_path, b"lib.so", (st.st_dev, st.st_ino))[4] is None    # unchanged: not opened
    assert _probe_file(tmp_path, b"lib.so", (st.st_dev, st.st_ino + 1))[4] == BID


def test_native_file_reader_is_confined_and_never_blocks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "lib.so").write_bytes(IMAGES["good"])
    os.mkfifo(root / "fifo")
    (root / "dir").mkdir()
    (root / "abs").symlink_to("/etc/lib.so")           # resolves inside the root
    (root / "up").symlink_to("../../../../../etc/passwd")
    (root / "exe").symlink_to("/proc/self/exe")         # no /proc in this root
    cases = {b"fifo": (0, errno.EINVAL), b"dir": (0, errno.EINVAL), b"up": (errno.ENOENT, 0),
             b"missing": (errno.ENOENT, 0), b"abs": (0, 0), b"exe": (errno.ENOENT, 0)}
    for rel, want in cases.items():
        err, open_err, *_rest, bid = _probe_file(root, rel)
        assert (err, open_err) == want, rel
        assert (bid == BID) == (rel == b"abs"), rel


def test_agent_leaves_a_library_without_build_id_alone(fx: Fixtures, no_bid: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    """The preload agent cannot open its own map_files: without build-ids it
    cannot show the bytes match, so it must not merge (it used to, on equal
    headers and first page, with this very pair of builds)."""
    from test_agent import agent_copy, env_with

    d = tmp_path / "lib"
    d.mkdir()
    lib = d / "libnb.so"
    shutil.copy2(no_bid[0], lib)
    agent = agent_copy("glibc", d)
    with Target([str(fx.target)], env=env_with(agent)) as t:
        first = t.open(lib)
        shutil.copy2(no_bid[1], d / "new.so")
        os.rename(d / "new.so", lib)  # other bytes past the first page
        replace_with_copy(agent)       # the agent sees a restore
        (tmp_path / "alias.so").symlink_to(lib)
        other = t.open(tmp_path / "alias.so")
        assert other.handle != first.handle and other.ctors == 2  # as without a restore


def test_native_file_reader_never_opens_procfs_or_sysfs(tmp_path: Path) -> None:
    """Regular files of procfs and sysfs are refused (EXDEV) without being
    opened, whatever comes before or after them in one batch (the check is
    made once per file system)."""
    lib = tmp_path / "lib.so"
    lib.write_bytes(IMAGES["good"])
    sysfs = next((p for p in (b"/sys/kernel/mm/transparent_hugepage/enabled", b"/sys/power/state",
                              b"/sys/kernel/profiling") if os.path.isfile(p)), None)
    names = [os.fsencode(lib), b"/proc/self/status", os.fsencode(lib), b"/proc/self/stat"]
    if sysfs:
        names += [sysfs, os.fsencode(lib), sysfs]
    rootfd = os.open("/", os.O_PATH | os.O_DIRECTORY)
    try:
        got = native.probe_files(rootfd, names, [(0, 0)] * len(names))
    finally:
        os.close(rootfd)
    for name, (err, open_err, *_rest, bid) in zip(names, got, strict=True):
        regular = name == os.fsencode(lib)
        assert (err, open_err) == (0, 0 if regular else errno.EXDEV), name
        assert (bid == BID) == regular, name


def test_byte_compare_is_bounded_and_short_cuts_the_file_itself(tmp_path: Path) -> None:
    from ldfix import identity
    from ldfix.procfs import Process

    root = identity.RootView(Process(os.getpid()))
    try:
        a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
        a.write_bytes(b"x" * 3_000_000)
        b.write_bytes(b"x" * 3_000_000)
        c.write_bytes(b"x" * 2_999_999 + b"y")
        ids = {p: FileId(os.stat(p).st_dev, os.stat(p).st_ino) for p in (a, b, c)}
        fa = os.open(a, os.O_RDONLY)
        try:
            assert root.same_bytes(os.fsencode(a), ids[a], fa) == \
                (True, "no build-id; the mapped file is the file itself")
            assert root.compare_budget == identity.COMPARE_BUDGET  # nothing read
            assert root.same_bytes(os.fsencode(b), ids[b], fa) == \
                (True, "no build-id; byte-identical to the mapped file")
            assert root.same_bytes(os.fsencode(c), ids[c], fa)[0] is False
            assert root.same_bytes(os.fsencode(b), ids[c], fa) == \
                (None, "the file was replaced while it was being compared")
            root.compare_budget = 2_000_000  # less than one file: undecided, nothing read
            same, how = root.same_bytes(os.fsencode(b), ids[b], fa)
            assert same is None and "more than ldfix allows" in how
            assert root.compare_budget == 2_000_000
        finally:
            os.close(fa)
    finally:
        root.close()
