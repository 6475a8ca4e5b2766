"""/proc/PID/maps asked one address at a time (PROCMAP_QUERY, Linux >= 6.11)
or read whole: both give the same answers, and a kernel without the ioctl is
served by the text."""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import Chroot, Fixtures, Target, ldfix as run_ldfix, replace_with_copy
from ldfix import native
from ldfix.memory import ProcessMemory
from ldfix.procfs import AT_BASE, AT_SYSINFO_EHDR, Process, parse_maps
from ldfix.target import open_target


def _query_works() -> bool:
    fd = os.open("/proc/self/maps", os.O_RDONLY)
    try:
        native.VmaQuery(fd).at(id(fd))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


needs_query = pytest.mark.skipif(not _query_works(), reason="kernel without PROCMAP_QUERY (< 6.11)")


def _view(pid: int, query: bool, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("LDFIX_PROCMAP_QUERY", "1" if query else "0")
    proc = Process(pid)
    mem = ProcessMemory(pid)
    return proc, mem, open_target(proc, mem)


@needs_query
def test_queried_and_read_maps_agree(fx: Fixtures, libdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Target([str(fx.target)]) as t:
        t.open(libdir / "libldfix_demo.so")
        answers = []
        for query in (True, False):
            proc, mem, view = _view(t.pid, query, monkeypatch)
            try:
                assert view.source is not None and view.source.queried == query
                # [vsyscall] is listed in the text but is no mapping of the
                # process (PROCMAP_QUERY does not see it); no object lives there.
                lines = [m for m in parse_maps(Path(f"/proc/{t.pid}/maps").read_bytes())
                         if m.path != b"[vsyscall]"]
                starts = view.starts()
                inside = [m.start + 8 for m in lines if m.end - m.start > 8]
                interp = view.interp
                assert interp is not None
                answers.append((
                    [m.start in starts for m in lines], [a in starts for a in inside],
                    0 in starts, (1 << 64) - 4096 in starts,
                    view.special(b"[vdso]"), (interp.start, interp.end, interp.mapping[:6], interp.path),
                ))
                assert not query or view.source._raw is None, "the text was read although queries served"
            finally:
                view.close()
                mem.close()
        q, r = answers
        assert q == r
        assert all(q[0]) and not any(q[1]) and not q[2] and not q[3]
        assert q[4] == (proc.auxv[AT_SYSINFO_EHDR], q[4][1]) and q[5][0] == proc.auxv[AT_BASE]


def _dump(pid: int, query: str) -> dict:  # type: ignore[type-arg]
    res = run_ldfix("dump", "--json", str(pid), env=dict(os.environ, LDFIX_PROCMAP_QUERY=query))
    assert res.returncode in (0, 8), res.stderr
    return json.loads(res.stdout)


@needs_query
def test_dump_is_the_same_either_way(fx: Fixtures, fx_musl: Fixtures, libdir: Path) -> None:
    """glibc (with a dlmopen namespace) and musl, one library stale."""
    lib = libdir / "libldfix_demo.so"
    for f, mopen in ((fx, True), (fx_musl, False)):
        with Target([str(f.target)]) as t:
            t.open(lib)
            if mopen:
                t.open(lib, mopen=True)
            replace_with_copy(lib)
            a, b = _dump(t.pid, "1"), _dump(t.pid, "0")
            assert a == b
            assert any(o["status"] == "stale" for o in a["objects"])


@needs_query
def test_dump_is_the_same_either_way_in_a_container(box: Chroot) -> None:
    """glibc 2.41 in a Debian 13 root: paths as the kernel prints them differ
    from the target's own."""
    t = box.start()
    t.open(box.lib())
    a = _dump(t.pid, "1")
    assert a == _dump(t.pid, "0") and a["loader"]["version"] == "2.41"


def _same_with_refusals(fx: Fixtures, libdir: Path, monkeypatch: pytest.MonkeyPatch,
                        refusals: dict[str, Callable[..., object]]) -> None:
    """One stale library; ldfix.inspect with the given VmaQuery methods
    refusing sees exactly what it saw without."""
    import ldfix

    lib = libdir / "libldfix_demo.so"
    with Target([str(fx.target)]) as t:
        t.open(lib)
        replace_with_copy(lib)
        want = ldfix.inspect(t.pid)
        for method, fake in refusals.items():
            monkeypatch.setattr(native.VmaQuery, method, fake)
        got = ldfix.inspect(t.pid)
        assert got.loader.layout_source == want.loader.layout_source is not None
        assert [(o.name, o.status, o.current) for o in got.objects] == \
            [(o.name, o.status, o.current) for o in want.objects]
        assert got.counts().get("stale") == 1


def test_a_kernel_without_the_ioctl_is_served_by_the_text(fx: Fixtures, libdir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self, addr: int, name: bool = False):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOTTY, "PROCMAP_QUERY: not supported")

    _same_with_refusals(fx, libdir, monkeypatch, {"at": refuse, "is_start": refuse})


def test_a_refusal_after_the_first_query_is_served_by_the_text(fx: Fixtures, libdir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter's mapping is queried, every question on starts refused."""
    calls = []

    def refused(self, addr: int):  # type: ignore[no-untyped-def]
        calls.append(addr)
        raise OSError(errno.EINVAL, "PROCMAP_QUERY: refused")

    _same_with_refusals(fx, libdir, monkeypatch, {"is_start": refused})
    assert calls or not _query_works()


def test_a_loader_path_longer_than_a_page(fx: Fixtures, tmp_path: Path) -> None:
    """A program run from a directory 4.6 KiB deep with --dynamic-linker=./ld.so:
    the kernel's name of the loader's mapping does not fit PROCMAP_QUERY's
    buffer (ENAMETOOLONG); the text answers that question."""
    import subprocess

    prog = tmp_path / "prog"
    subprocess.run(["gcc", "-O2", "-rdynamic", "-Wl,--dynamic-linker=./ld.so", "-o", str(prog),
                    str(Path(__file__).parent.parent / "csrc/fixtures/target.c"), "-ldl", "-lpthread"],
                   check=True)
    segments = ["d" * 250] * 19
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    for seg in segments:  # deeper than PATH_MAX: built one directory at a time
        os.mkdir(seg, dir_fd=fd)
        nfd = os.open(seg, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)
    ld = os.path.realpath("/lib64/ld-linux-x86-64.so.2")
    # chdir one short relative step at a time (a shell's cd would build the whole path)
    script = ("import os, shutil, sys\n"
              f"os.chdir({str(tmp_path)!r})\n"
              f"for s in {segments!r}: os.chdir(s)\n"
              f"shutil.copy2({str(prog)!r}, 'prog'); shutil.copy2({ld!r}, 'ld.so')\n"
              "os.execv('./prog', ['./prog'])\n")
    with Target([sys.executable, "-c", script]) as t:
        t.open(fx.lib)
        a, b = _dump(t.pid, "1"), _dump(t.pid, "0")
        assert a == b
        assert a["loader"]["layout_source"] is not None
        assert any(o["name"] == str(fx.lib) and o["status"] == "ok" for o in a["objects"])
