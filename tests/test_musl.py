"""musl targets: musl 1.2.3 (the host's musl-gcc), 1.2.5 (the trixie root) and
1.2.2 (the bullseye root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import ldfix
from helpers import (Chroot, FifoTarget, Fixtures, Target, ldfix as run_ldfix, remount_fresh_tmpfs,
                     replace_with_copy)
from ldfix.model import Status


def musl_version(root: Path = Path("/")) -> str:
    out = subprocess.run([str(root / "lib/ld-musl-x86_64.so.1")] if root == Path("/") else
                         ["chroot", str(root), "/lib/ld-musl-x86_64.so.1"],
                         capture_output=True, text=True)
    for line in out.stderr.splitlines():
        if line.startswith("Version "):
            return line.split()[1]
    raise AssertionError(f"no version from the musl loader: {out.stderr!r}")


def check_repair(t: Target, twin: Target, lib: str, alias: str, restore, kind_version: str) -> None:  # type: ignore[no-untyped-def]
    first, twin_first = t.open(lib), twin.open(lib)
    assert first.ctors == 1
    restore()
    ins = ldfix.inspect(t.pid)
    assert (ins.loader.kind, ins.loader.version) == ("musl", kind_version)
    assert ins.loader.layout_source == "structure+table"
    (obj,) = [o for o in ins.objects if o.display_name == lib]
    assert obj.status is Status.STALE, obj.reason
    roles = {o.role: o.status for o in ins.objects}
    assert roles["main"] is Status.UNSET and roles["loader"] is Status.UNSET
    assert roles["vdso"] is Status.VIRTUAL
    second = twin.open(alias)  # the bug, observed
    assert second.handle != twin_first.handle and second.ctors == 2
    res = run_ldfix("fix", "--json", str(t.pid))
    assert res.returncode == 0, res.stderr
    (proc,) = json.loads(res.stdout)["processes"]
    assert proc["loader"]["kind"] == "musl" and [r["name"] for r in proc["rewritten"]] == [lib]
    again = t.open(alias)
    assert again.handle == first.handle and again.state == first.state and again.ctors == 1
    assert run_ldfix("check", str(t.pid)).returncode == 0


def test_musl_host_new_inode(fx_musl: Fixtures, tmp_path: Path) -> None:
    d = tmp_path / "lib"
    d.mkdir()
    lib = d / "libldfix_demo.so"
    shutil.copy2(fx_musl.lib, lib)
    (tmp_path / "alias.so").symlink_to(lib)
    with Target([str(fx_musl.target)]) as t, Target([str(fx_musl.target)]) as twin:
        check_repair(t, twin, str(lib), str(tmp_path / "alias.so"), lambda: replace_with_copy(lib),
                     musl_version())


def test_musl_host_fresh_tmpfs(fx_musl: Fixtures, tmp_path: Path) -> None:
    d = tmp_path / "mnt"
    d.mkdir()
    script = f"mount -t tmpfs ldfix-before {d} && cp {fx_musl.lib} {d}/ && exec {fx_musl.target}"
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
    lib = d / fx_musl.lib.name
    with Target(argv) as t, Target(argv) as twin:
        def restore() -> None:
            for p in (t.pid, twin.pid):
                remount_fresh_tmpfs(p, d, [fx_musl.lib])
                subprocess.run(["nsenter", "-t", str(p), "-m", "ln", "-s", str(lib), str(d / "alias.so")],
                               check=True)
        check_repair(t, twin, str(lib), str(d / "alias.so"), restore, musl_version())


def check_new_inode_in_root(box: Chroot, version: str) -> None:
    """musl `version` in a foreign root: a restore by a new inode, repaired."""
    assert musl_version(box.root) == version
    lib = box.lib()
    alias = f"{box.inner}/alias.so"
    os.symlink(lib, box.host(alias))
    t, twin = box.start(), box.start()
    check_repair(t, twin, lib, alias, lambda: replace_with_copy(box.host(lib)), version)


def test_musl_125_in_trixie_root(musl_box: Chroot) -> None:
    check_new_inode_in_root(musl_box, "1.2.5")


def test_musl_125_fresh_tmpfs(musl_box: Chroot) -> None:
    t = musl_box.start(tmpfs_libdir="mnt")
    twin = musl_box.start(tmpfs_libdir="mnt")
    lib = musl_box.lib("mnt")
    host_dir = musl_box.host_dir / "mnt"

    # The alias is relative: inside the chroot the host-side path does not exist.
    def restore_rel() -> None:
        for p in (t.pid, twin.pid):
            remount_fresh_tmpfs(p, host_dir, [musl_box.fx.lib])
            subprocess.run(["nsenter", "-t", str(p), "-m", "ln", "-s", musl_box.fx.lib.name,
                            str(host_dir / "alias.so")], check=True)
    check_repair(t, twin, lib, f"{musl_box.inner}/mnt/alias.so", restore_rel, "1.2.5")


def test_musl_122_in_bullseye_root(old_musl_box: Chroot) -> None:
    check_new_inode_in_root(old_musl_box, "1.2.2")


def test_musl_changed_and_missing(fx_musl: Fixtures, tmp_path: Path) -> None:
    a, b = tmp_path / "liba.so", tmp_path / "libb.so"
    shutil.copy2(fx_musl.lib, a)
    shutil.copy2(fx_musl.lib, b)
    with Target([str(fx_musl.target)]) as t:
        first = t.open(a)
        t.open(b)
        shutil.copy2(fx_musl.lib_v2, tmp_path / "new.so")
        os.rename(tmp_path / "new.so", a)
        os.unlink(b)
        rep = ldfix.fix(t.pid)
        assert rep.rewritten == []
        status = {s.name: s.status for s in rep.skipped}
        assert status[os.fsencode(a)] is Status.CHANGED
        assert status[os.fsencode(b)] is Status.MISSING
        (tmp_path / "alias.so").symlink_to(a)
        assert t.open(tmp_path / "alias.so").handle != first.handle  # new build: a new object


@pytest.mark.parametrize("parent_libc", ["glibc", "musl"])
def test_mixed_tree(parent_libc: str, fx: Fixtures, fx_musl: Fixtures, tmp_path: Path) -> None:
    parent_fx, child_fx = (fx, fx_musl) if parent_libc == "glibc" else (fx_musl, fx)
    d = tmp_path / "lib"
    d.mkdir()
    libs = {"glibc": d / "libglibc.so", "musl": d / "libmusl.so"}
    shutil.copy2(fx.lib, libs["glibc"])
    shutil.copy2(fx_musl.lib, libs["musl"])
    child_libc = "musl" if parent_libc == "glibc" else "glibc"
    with Target([str(parent_fx.target)]) as parent:
        child = FifoTarget(parent, "spawn", tmp_path / "fifos", prog=child_fx.target)
        try:
            p_first = parent.open(libs[parent_libc])
            c_first = child.open(libs[child_libc])
            replace_with_copy(libs["glibc"])
            replace_with_copy(libs["musl"])
            res = run_ldfix("fix", "--tree", "--json", str(parent.pid))
            assert res.returncode == 0, res.stderr
            doc = json.loads(res.stdout)
            kinds = {p["pid"]: p["loader"]["kind"] for p in doc["processes"]}
            assert kinds == {parent.pid: parent_libc, child.pid: child_libc}
            assert all(len(p["rewritten"]) == 1 for p in doc["processes"])
            for tgt, libc, first in ((parent, parent_libc, p_first), (child, child_libc, c_first)):
                alias = tmp_path / f"alias-{libc}.so"
                alias.symlink_to(libs[libc])
                assert tgt.open(alias).handle == first.handle
        finally:
            child.kill()


def test_musl_calibration_probe_without_table(fx_musl: Fixtures, tmp_path: Path) -> None:
    libs = [tmp_path / f"lib{i}.so" for i in range(3)]
    for p in libs:
        shutil.copy2(fx_musl.lib, p)
    with Target([str(fx_musl.target)]) as t:
        for p in libs:
            t.open(p)
        replace_with_copy(libs[0])
        ins = ldfix.inspect(t.pid, sources=["structure", "probe"])
        assert ins.loader.layout_source == "structure+probe", ins.loader.layout_error
        got = {o.display_name: o.status for o in ins.objects}
        assert got[str(libs[0])] is Status.STALE
        assert got[str(libs[1])] is Status.OK and got[str(libs[2])] is Status.OK
        rep = ldfix.fix(t.pid, options=ldfix_options(["structure", "probe"]))
        assert [r.name for r in rep.rewritten] == [os.fsencode(libs[0])]


def ldfix_options(sources: list[str]):  # type: ignore[no-untyped-def]
    from ldfix.api import Options
    return Options(sources=frozenset(sources))
