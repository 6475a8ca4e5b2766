"""ldfix dump / ldfix.inspect on real processes running another glibc: 2.41
from the Debian 13 "trixie" root that scripts/make-test-roots builds.

The fixture programs compiled on the host (glibc 2.36) are copied into a fresh
directory inside the root and run chrooted there, each in a private mount
namespace (unshare -m) so that the mounts a test needs (a tmpfs over the
debug files, a tmpfs library directory, the simulated restore's fresh tmpfs)
exist for the target only and vanish with it.  There is no pid namespace: the
target's "ready PID" is its host pid, and ldfix runs from the host."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import ldfix
from helpers import (DEBUG_DIR, Chroot, assert_table_matches_dwarf, debug_file, dwarf_layout, elf_build_id,
                     ldfix as run_ldfix, remount_fresh_tmpfs, replace_with_copy)
from ldfix.model import Status

VERSION = "2.41"
FILE_ID_OFFSET = 992  # l_file_id in struct link_map, glibc 2.39+ on x86_64
ARCH_LIBDIR = "usr/lib/x86_64-linux-gnu"


def loader_build_id(root: Path) -> bytes:
    return elf_build_id(root / ARCH_LIBDIR / "ld-linux-x86-64.so.2")


@pytest.fixture(scope="module")
def trixie_debug(trixie: Path) -> Path:
    """The debug file of the root's ld.so (from libc6-dbg)."""
    p = debug_file(trixie / DEBUG_DIR, loader_build_id(trixie))
    if not p.exists():
        pytest.skip(f"no libc6-dbg debug file for trixie's ld.so at {p} (rebuild the root with "
                    "scripts/make-test-roots)")
    return p


def by_name(ins: ldfix.Inspection) -> dict[str, list[ldfix.LoadedObject]]:
    out: dict[str, list[ldfix.LoadedObject]] = {}
    for o in ins.objects:
        out.setdefault(o.display_name, []).append(o)
    return out


def stat_in_root(pid: int, name: str) -> os.stat_result:
    """The file as the target sees it (its root, its mount namespace)."""
    return os.stat(f"/proc/{pid}/root{name}")


def assert_restore_statuses(ins: ldfix.Inspection, restored: str) -> None:
    """The restored library stale; every other library (libc among them) ok;
    the program and ld.so unset; the vdso virtual."""
    roles = {o.role for o in ins.objects}
    assert {"main", "loader", "vdso", "library"} <= roles, roles
    libs = [o.display_name for o in ins.objects if o.role == "library"]
    assert "/lib/x86_64-linux-gnu/libc.so.6" in libs, libs
    for o in ins.objects:
        if o.display_name == restored:
            assert o.status is Status.STALE, o.reason
            assert o.writable
        elif o.role == "library":
            assert o.status is Status.OK, (o.display_name, o.status, o.reason)
        elif o.role in ("main", "loader"):
            assert o.status is Status.UNSET, (o.display_name, o.status, o.reason)
        elif o.role == "vdso":
            assert o.status is Status.VIRTUAL
        else:
            pytest.fail(f"unexpected role {o.role} for {o.display_name}")


def test_dump_glibc_241_with_dwarf(box: Chroot, trixie_debug: Path) -> None:
    t = box.start()
    lib = box.lib()
    t.open(lib)
    ins = ldfix.inspect(t.pid)
    assert ins.loader.kind == "glibc"
    assert ins.loader.version == VERSION
    assert ins.loader.layout_source == "dwarf", ins.loader.layout_error
    assert not ins.partial, ins.warnings
    assert ins.namespaces() == [0]
    # Names are the target's own (inside its root), and every id is fresh.
    (o,) = by_name(ins)[lib]
    assert o.status is Status.OK, o.reason
    for x in ins.objects:
        assert x.status in (Status.OK, Status.UNSET, Status.VIRTUAL), (x.display_name, x.status, x.reason)
    res = run_ldfix("dump", "--json", str(t.pid))
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["loader"]["kind"] == "glibc"
    assert doc["loader"]["version"] == VERSION
    assert doc["loader"]["layout_source"] == "dwarf"
    assert doc["loader"]["layout_error"] is None
    statuses = {o["role"]: o["status"] for o in doc["objects"] if o["role"] != "library"}
    assert statuses == {"main": "unset", "loader": "unset", "vdso": "virtual"}
    (j,) = [x for x in doc["objects"] if x["name"] == lib]
    assert j["status"] == "ok"
    table = run_ldfix("dump", str(t.pid)).stdout
    assert f"glibc {VERSION} x86_64, layout: dwarf" in table


def test_file_id_offset_is_992(box: Chroot, trixie_debug: Path) -> None:
    # What the DWARF of trixie's ld.so says...
    layout = dwarf_layout(trixie_debug)
    assert layout is not None
    assert layout.file_id == FILE_ID_OFFSET
    # ...is what ldfix uses on a live 2.41 process...
    t = box.start()
    lib = box.lib()
    t.open(lib)
    ins = ldfix.inspect(t.pid)
    assert ins.loader.layout_source == "dwarf"
    with_ids = [o for o in ins.objects if o.id_address is not None]
    assert with_ids
    assert {o.id_address - o.address for o in with_ids} == {FILE_ID_OFFSET}  # type: ignore[operator]
    # ...and is right: the 16 bytes there are the files' (dev, ino) as stat()
    # sees them inside the target's root.
    for name in (lib, "/lib/x86_64-linux-gnu/libc.so.6"):
        (o,) = by_name(ins)[name]
        st = stat_in_root(t.pid, name)
        assert o.stored == ldfix.FileId(st.st_dev, st.st_ino), name
        assert o.status is Status.OK
    raw = open(f"/proc/{t.pid}/mem", "rb", buffering=0)
    try:
        (o,) = by_name(ins)[lib]
        raw.seek(o.address + FILE_ID_OFFSET)
        st = stat_in_root(t.pid, lib)
        assert ldfix.FileId.unpack(raw.read(16)) == ldfix.FileId(st.st_dev, st.st_ino)
    finally:
        raw.close()


def test_table_row_for_241_matches_dwarf(trixie_debug: Path) -> None:
    """layouts_table's 2.39+ x86_64 rows name this build as verified: they must
    agree with its DWARF on every field ldfix reads from a link_map and on
    _rtld_global's head.  Not _ns_debug: Debian's 2.41 (since 2.41-12+deb13u2)
    carries the stable-branch fix "_r_debug handling when interposed by the main
    executable", after which that member is _ns_debug_unused (the namespaces'
    r_debug live elsewhere), so its DWARF names no _ns_debug."""
    assert_table_matches_dwarf(dwarf_layout(trixie_debug), VERSION)


def test_no_dwarf_anywhere_gives_structure_and_table(box: Chroot, trixie: Path, trixie_debug: Path) -> None:
    bid = loader_build_id(trixie)
    if debug_file(Path("/usr/lib/debug"), bid).exists():
        pytest.skip("the host holds a debug file for trixie's ld.so: DWARF cannot be hidden")
    with_debug = box.start()
    hidden = box.start(hide_debug=True)
    assert os.listdir(f"/proc/{hidden.pid}/root/{DEBUG_DIR}") == []
    assert os.path.exists(f"/proc/{with_debug.pid}/root/{DEBUG_DIR}/.build-id")
    lib = box.lib()
    with_debug.open(lib)
    hidden.open(lib)
    replace_with_copy(box.host(lib))
    a = ldfix.inspect(with_debug.pid)
    b = ldfix.inspect(hidden.pid)
    assert a.loader.layout_source == "dwarf"
    assert b.loader.layout_source == "structure+table", b.loader.layout_error
    assert b.loader.layout_error is None
    assert b.loader.version == VERSION
    # The same statuses (and the same ids read) whichever source gave the layout.
    assert [(o.display_name, o.role, o.status) for o in a.objects] == \
        [(o.display_name, o.role, o.status) for o in b.objects]
    assert {o.display_name: o.stored for o in a.objects if o.role == "library"} == \
        {o.display_name: o.stored for o in b.objects if o.role == "library"}
    assert_restore_statuses(b, lib)
    doc = json.loads(run_ldfix("dump", "--json", str(hidden.pid)).stdout)
    assert doc["loader"]["layout_source"] == "structure+table"
    assert doc["loader"]["version"] == VERSION


def test_restore_new_inode_shows_stale(box: Chroot) -> None:
    t = box.start()
    lib = box.lib()
    t.open(lib)
    before = stat_in_root(t.pid, lib)
    replace_with_copy(box.host(lib))
    after = stat_in_root(t.pid, lib)
    assert before.st_ino != after.st_ino
    ins = ldfix.inspect(t.pid)
    assert_restore_statuses(ins, lib)
    (o,) = by_name(ins)[lib]
    assert o.stored == ldfix.FileId(before.st_dev, before.st_ino)
    assert o.current == ldfix.FileId(after.st_dev, after.st_ino)
    doc = json.loads(run_ldfix("dump", "--json", str(t.pid)).stdout)
    (j,) = [x for x in doc["objects"] if x["name"] == lib]
    assert j["status"] == "stale"
    assert j["stored"] == {"dev": before.st_dev, "ino": before.st_ino}
    assert j["current"] == {"dev": after.st_dev, "ino": after.st_ino}


def test_restore_fresh_tmpfs_in_private_mount_namespace(box: Chroot) -> None:
    t = box.start(tmpfs_libdir="mnt")
    lib = box.lib("mnt")
    t.open(lib)
    old = ldfix.inspect(t.pid)
    (o,) = by_name(old)[lib]
    assert o.status is Status.OK, o.reason
    st = stat_in_root(t.pid, lib)
    assert o.stored == ldfix.FileId(st.st_dev, st.st_ino)
    # The target's tmpfs is not the host's directory.
    assert os.stat(box.host(box.inner + "/mnt")).st_dev != st.st_dev
    remount_fresh_tmpfs(t.pid, box.host(box.inner + "/mnt"), [box.fx.lib])
    new = ldfix.inspect(t.pid)
    assert new.loader.layout_source == "dwarf"
    assert_restore_statuses(new, lib)
    (n,) = by_name(new)[lib]
    assert n.stored == o.stored
    assert n.current is not None and n.current.dev != o.stored.dev  # type: ignore[union-attr]
    # The host's view is untouched: nothing in the host's directory.
    assert not box.host(lib).exists()


def test_dlmopen_namespace_is_listed(box: Chroot) -> None:
    t = box.start()
    lib = box.lib()
    t.open(lib)
    opened = t.open(lib, mopen=True)
    assert opened.lmid > 0
    ins = ldfix.inspect(t.pid)
    assert ins.loader.version == VERSION
    assert ins.namespaces() == [0, opened.lmid]
    copies = by_name(ins)[lib]
    assert sorted(o.namespace for o in copies) == [0, opened.lmid]
    assert all(o.status is Status.OK for o in copies), [(o.namespace, o.reason) for o in copies]
    # The demo library needs nothing, so it is alone in the new namespace.
    assert [o.display_name for o in ins.objects if o.namespace == opened.lmid] == [lib]
    table = run_ldfix("dump", str(t.pid)).stdout
    assert f"namespace {opened.lmid}:" in table
    doc = json.loads(run_ldfix("dump", "--json", str(t.pid)).stdout)
    assert {o["namespace"] for o in doc["objects"] if o["name"] == lib} == {0, opened.lmid}


@pytest.mark.parametrize("hide_debug", [False, True], ids=["dwarf", "no-dwarf"])
def test_fix_241_new_inode(box: Chroot, hide_debug: bool) -> None:
    lib = box.lib()
    alias = f"{box.inner}/alias.so"
    os.symlink(lib, box.host(alias))
    t, twin = box.start(hide_debug=hide_debug), box.start(hide_debug=hide_debug)
    first, twin_first = t.open(lib), twin.open(lib)
    replace_with_copy(box.host(lib))
    second = twin.open(alias)  # without ldfix: a second copy, observed
    assert second.handle != twin_first.handle and second.ctors == 2
    rep = ldfix.fix(t.pid)
    assert rep.loader is not None and rep.loader.version == VERSION
    assert rep.loader.layout_source == ("structure+table" if hide_debug else "dwarf")
    assert [r.name.decode() for r in rep.rewritten] == [lib]
    again = t.open(alias)
    assert again.handle == first.handle and again.state == first.state and again.ctors == 1


def test_fix_241_fresh_tmpfs(box: Chroot) -> None:
    t, twin = box.start(tmpfs_libdir="mnt"), box.start(tmpfs_libdir="mnt")
    lib = box.lib("mnt")
    host_dir = box.host_dir / "mnt"
    first, twin_first = t.open(lib), twin.open(lib)
    for p in (t.pid, twin.pid):
        remount_fresh_tmpfs(p, host_dir, [box.fx.lib])
        subprocess.run(["nsenter", "-t", str(p), "-m", "ln", "-s", box.fx.lib.name,
                        str(host_dir / "alias.so")], check=True)
    alias = f"{box.inner}/mnt/alias.so"
    assert twin.open(alias).handle != twin_first.handle
    res = run_ldfix("fix", "--json", str(t.pid))
    assert res.returncode == 0, res.stderr
    (proc,) = json.loads(res.stdout)["processes"]
    assert [r["name"] for r in proc["rewritten"]] == [lib]
    assert proc["rewritten"][0]["new"]["dev"] != proc["rewritten"][0]["old"]["dev"]
    again = t.open(alias)
    assert again.handle == first.handle and again.ctors == 1
