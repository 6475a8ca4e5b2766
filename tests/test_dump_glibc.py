"""ldfix dump / ldfix.inspect on real glibc processes of the host (glibc 2.36 here)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import ldfix
from helpers import Fixtures, Target, ldfix as run_ldfix, remount_fresh_tmpfs, replace_with_copy
from ldfix.model import Status


def by_name(ins: ldfix.Inspection) -> dict[str, list[ldfix.LoadedObject]]:
    out: dict[str, list[ldfix.LoadedObject]] = {}
    for o in ins.objects:
        out.setdefault(o.display_name, []).append(o)
    return out


def test_dump_lists_what_pldd_lists(target: Target, libdir: Path) -> None:
    target.open(libdir / "libldfix_demo.so")
    pldd = subprocess.run(["pldd", str(target.pid)], capture_output=True, text=True, check=True)
    pldd_paths = [line.strip() for line in pldd.stdout.splitlines()[1:] if line.strip()]
    exe = pldd.stdout.splitlines()[0].split(":", 1)[1].strip()
    res = run_ldfix("dump", "--json", str(target.pid))
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    names = [o["name"] for o in doc["objects"]]
    assert exe in names
    assert str(libdir / "libldfix_demo.so") in pldd_paths
    for p in pldd_paths:
        assert p in names, f"pldd lists {p}, ldfix does not"
    assert doc["loader"]["kind"] == "glibc"
    assert doc["loader"]["version"] == os.confstr("CS_GNU_LIBC_VERSION").split()[1]
    assert doc["loader"]["layout_source"] == "dwarf"


def test_dump_json_ids_match_stat(target: Target, libdir: Path) -> None:
    lib = libdir / "libldfix_demo.so"
    target.open(lib)
    doc = json.loads(run_ldfix("dump", "--json", str(target.pid)).stdout)
    (obj,) = [o for o in doc["objects"] if o["name"] == str(lib)]
    st = os.stat(lib)
    assert obj["stored"] == {"dev": st.st_dev, "ino": st.st_ino}
    assert obj["current"] == obj["stored"]
    assert obj["status"] == "ok"
    assert isinstance(obj["base"], int)
    statuses = {o["role"]: o["status"] for o in doc["objects"]}
    assert statuses["main"] == "unset"
    assert statuses["loader"] == "unset"
    assert statuses["vdso"] == "virtual"


def test_dlmopen_namespace_is_listed(target: Target, libdir: Path) -> None:
    lib = libdir / "libldfix_demo.so"
    target.open(lib)
    opened = target.open(lib, mopen=True)
    assert opened.lmid > 0
    ins = ldfix.inspect(target.pid)
    copies = by_name(ins)[str(lib)]
    assert sorted(o.namespace for o in copies) == [0, opened.lmid]
    assert all(o.status is Status.OK for o in copies)
    table = run_ldfix("dump", str(target.pid)).stdout
    assert f"namespace {opened.lmid}:" in table


def test_restore_new_inode_shows_stale(target: Target, libdir: Path) -> None:
    lib = libdir / "libldfix_demo.so"
    target.open(lib)
    before = os.stat(lib)
    replace_with_copy(lib)
    after = os.stat(lib)
    assert before.st_ino != after.st_ino
    ins = ldfix.inspect(target.pid)
    for o in ins.objects:
        if o.display_name == str(lib):
            assert o.status is Status.STALE, o.reason
            assert o.stored == ldfix.FileId(before.st_dev, before.st_ino)
            assert o.current == ldfix.FileId(after.st_dev, after.st_ino)
        elif o.role == "library":
            assert o.status is Status.OK, (o.display_name, o.reason)
        elif o.role in ("main", "loader"):
            assert o.status is Status.UNSET
        elif o.role == "vdso":
            assert o.status is Status.VIRTUAL


def test_restore_fresh_tmpfs_in_private_mount_namespace(fx: Fixtures, tmp_path: Path) -> None:
    libdir = tmp_path / "mnt"
    libdir.mkdir()
    script = (f"mount -t tmpfs -o size=16m ldfix-before {libdir} && cp {fx.lib} {libdir}/ && "
              f"exec {fx.target}")
    with Target(["unshare", "-m", "--propagation", "private", "sh", "-c", script]) as t:
        lib = libdir / fx.lib.name
        t.open(lib)
        old = ldfix.inspect(t.pid)
        (o,) = [x for x in old.objects if x.display_name == str(lib)]
        assert o.status is Status.OK
        remount_fresh_tmpfs(t.pid, libdir, [fx.lib])
        new = ldfix.inspect(t.pid)
        (n,) = [x for x in new.objects if x.display_name == str(lib)]
        assert n.status is Status.STALE, n.reason
        assert n.stored == o.stored
        assert n.current is not None and n.current.dev != o.stored.dev  # type: ignore[union-attr]
        # The host's view is untouched: nothing under libdir on the host.
        assert not (libdir / fx.lib.name).exists()
        others = [x for x in new.objects if x.role == "library" and x.display_name != str(lib)]
        assert others and all(x.status is Status.OK for x in others)


def test_changed_and_missing(fx: Fixtures, tmp_path: Path) -> None:
    d = tmp_path / "lib"
    d.mkdir()
    a, b = d / "liba.so", d / "libb.so"
    import shutil
    shutil.copy2(fx.lib, a)
    shutil.copy2(fx.lib, b)
    with Target([str(fx.target)]) as t:
        t.open(a)
        t.open(b)
        tmp = d / "liba.new"
        shutil.copy2(fx.lib_v2, tmp)
        os.rename(tmp, a)  # another build at the same path
        os.unlink(b)
        ins = ldfix.inspect(t.pid)
        got = {o.display_name: o for o in ins.objects}
        assert got[str(a)].status is Status.CHANGED, got[str(a)].reason
        assert "build-id" in got[str(a)].reason
        assert got[str(b)].status is Status.MISSING
        assert got[str(b)].current is None


def test_debug_files_hidden_gives_structure_and_table(target: Target, libdir: Path) -> None:
    lib = libdir / "libldfix_demo.so"
    target.open(lib)
    replace_with_copy(lib)
    with_dwarf = ldfix.inspect(target.pid)
    without = ldfix.inspect(target.pid, debug_dirs=[])
    assert with_dwarf.loader.layout_source == "dwarf"
    assert without.loader.layout_source == "structure+table"
    assert [(o.display_name, o.status) for o in with_dwarf.objects] == \
        [(o.display_name, o.status) for o in without.objects]
    env = dict(os.environ, LDFIX_DEBUG_DIRS="")
    doc = json.loads(run_ldfix("dump", "--json", str(target.pid), env=env).stdout)
    assert doc["loader"]["layout_source"] == "structure+table"


def test_control_characters_in_names_are_escaped(fx: Fixtures, tmp_path: Path) -> None:
    d = tmp_path / "we\x1b[2Jird\nname"
    d.mkdir()
    import shutil
    shutil.copy2(fx.lib, d / "lib.so")
    with Target([str(fx.target)]) as t:
        t.open(d / "lib.so")
        out = run_ldfix("dump", str(t.pid)).stdout
        assert "\x1b" not in out
        assert "we\\x1b[2Jird\\nname/lib.so" in out
        doc = json.loads(run_ldfix("dump", "--json", str(t.pid)).stdout)
        assert any(o["name"].endswith("we\\x1b[2Jird\\nname/lib.so") for o in doc["objects"])


def test_system_library_with_two_note_segments_is_stale_not_changed(target: Target, tmp_path: Path) -> None:
    """Debian's libraries carry .note.gnu.property in a PT_NOTE of its own before
    the one with the build-id: the mapped image's build-id must still be found."""
    src = Path("/lib/x86_64-linux-gnu/libm.so.6")
    out = subprocess.run(["readelf", "-lW", str(src)], capture_output=True, text=True).stdout
    assert out.count(" NOTE ") >= 2, "this test needs a library with two PT_NOTE segments"
    lib = tmp_path / "libm-copy.so.6"
    import shutil
    shutil.copy2(src, lib)
    assert target.cmd(f"openx {os.fsencode(lib).hex()}").startswith("ok")
    replace_with_copy(lib)
    (obj,) = [o for o in ldfix.inspect(target.pid).objects if o.display_name == str(lib)]
    assert obj.status is Status.STALE, obj.reason
    assert "build-id" in obj.reason


def test_calibration_probe_without_dwarf_or_table(fx: Fixtures, tmp_path: Path) -> None:
    """No DWARF, no table row: the stat calibration on the target's own
    unchanged libraries, agreeing with the structure, decides the layout."""
    import shutil
    a, b = tmp_path / "a.so", tmp_path / "b.so"
    shutil.copy2(fx.lib, a)
    shutil.copy2(fx.lib, b)
    with Target([str(fx.target)]) as t:
        t.open(a)
        t.open(b)
        replace_with_copy(a)
        ins = ldfix.inspect(t.pid, debug_dirs=[], sources=["structure", "probe"])
        assert ins.loader.layout_source == "structure+probe", ins.loader.layout_error
        got = {o.display_name: o.status for o in ins.objects}
        assert got[str(a)] is Status.STALE and got[str(b)] is Status.OK
        # The same answer as the table's: the offset is the one glibc 2.36 uses.
        full = ldfix.inspect(t.pid, debug_dirs=[])
        assert [(o.display_name, o.status, o.id_address) for o in full.objects] == \
            [(o.display_name, o.status, o.id_address) for o in ins.objects]
        # The structure alone never decides: nothing is verified, ids unknown.
        alone = ldfix.inspect(t.pid, debug_dirs=[], sources=["structure"])
        assert alone.loader.layout_source is None and alone.loader.layout_error
        assert {o.status for o in alone.objects} == {Status.UNKNOWN}
