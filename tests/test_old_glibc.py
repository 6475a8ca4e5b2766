"""glibc 2.31 (Debian 11 "bullseye", scripts/make-test-roots): older than
2.35, so its r_debug has no r_next chain and the dlmopen namespaces are found
only through _rtld_global's _dl_ns[] (reference table T3).  Real processes:
the fixtures are compiled inside the root with its own gcc (a program built
on the host needs glibc 2.34+) and run chrooted in a private mount namespace.

Before this file that route was covered by crafted memory images only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import ldfix
from helpers import (FIXTURE_SRC, Chroot, Fixtures, Target, assert_table_matches_dwarf, chroot_box, debug_file,
                     dwarf_layout, elf_build_id, ldfix as run_ldfix, replace_with_copy)
from ldfix.model import Status

VERSION = "2.31"


@pytest.fixture(scope="module")
def old_fx(bullseye: Path) -> Iterator[Fixtures]:
    """The fixture programs, compiled inside the root for its glibc 2.31."""
    if not (bullseye / "usr/bin/gcc").exists():
        pytest.skip(f"no gcc in {bullseye} (rebuild it with scripts/make-test-roots)")
    d = Path(tempfile.mkdtemp(prefix="ldfix-fx-", dir=bullseye / "tmp"))
    os.chmod(d, 0o755)
    inner = "/" + str(d.relative_to(bullseye))
    try:
        for src in ("target.c", "libdemo.c"):
            shutil.copy2(FIXTURE_SRC / src, d / src)

        def cc(*args: str) -> None:
            subprocess.run(["chroot", str(bullseye), "gcc", *args], check=True, capture_output=True)
        cc("-O2", "-Wall", "-rdynamic", "-o", f"{inner}/ldfix-target", f"{inner}/target.c", "-ldl", "-lpthread")
        for variant, name in ((1, "libldfix_demo.so"), (2, "libldfix_demo_v2.so")):
            cc("-O2", "-Wall", "-shared", "-fPIC", "-Wl,--build-id", "-Wl,-soname,libldfix_demo.so",
               f"-DLDFIX_DEMO_VARIANT={variant}", "-o", f"{inner}/{name}", f"{inner}/libdemo.c")
        yield Fixtures(d / "ldfix-target", d / "libldfix_demo.so", d / "libldfix_demo_v2.so", "gcc")
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def old_box(bullseye: Path, old_fx: Fixtures) -> Iterator[Chroot]:
    with chroot_box(bullseye, old_fx) as c:
        yield c


def _libs(ins: ldfix.Inspection, name: str) -> list[ldfix.LoadedObject]:
    return [o for o in ins.objects if o.display_name == name]


@pytest.mark.parametrize("sources", [None, "structure,table"], ids=["dwarf", "structure+table"])
def test_namespaces_of_glibc_231_are_found_and_repaired(old_box: Chroot, sources: str | None) -> None:
    """dlopen and dlmopen, a restore (new inode), then `ldfix fix`: both
    namespaces' ids are rewritten, and a dlmopen into namespace 1 through
    another path finds the loaded copy; a twin left alone loads a second."""
    lib = old_box.lib()
    env = dict(os.environ)
    if sources:
        env["LDFIX_LAYOUT_SOURCES"] = sources
    t, twin = old_box.start(), old_box.start()
    first = {0: t.open(lib), 1: t.open(lib, mopen=True)}
    twin_first = twin.open(lib, mopen=True)
    assert first[1].lmid == 1 and twin_first.lmid == 1
    replace_with_copy(old_box.host(lib))
    alias = f"{old_box.inner}/alias.so"
    os.symlink(lib, old_box.host(alias))

    res = run_ldfix("dump", "--json", str(t.pid), env=env)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["loader"]["kind"] == "glibc" and doc["loader"]["version"] == VERSION
    assert doc["loader"]["layout_source"] == ("dwarf" if sources is None else "structure+table")
    assert not doc["partial"], doc["warnings"]
    ours = [o for o in doc["objects"] if o["name"] == lib]
    assert sorted(o["namespace"] for o in ours) == [0, 1]
    assert all(o["status"] == "stale" for o in ours)

    res = run_ldfix("fix", "--json", str(t.pid), env=env)
    assert res.returncode == 0, res.stderr
    (proc,) = json.loads(res.stdout)["processes"]
    assert sorted(r["namespace"] for r in proc["rewritten"]) == [0, 1]
    st = os.stat(old_box.host(lib))
    assert all(r["new"] == {"dev": st.st_dev, "ino": st.st_ino} for r in proc["rewritten"])

    # The bug, observed in the twin: a second copy in namespace 1.
    second = twin.nsopen(1, alias)
    # (ctors counts namespace 0 only: the counter lives in the program.)
    assert second.handle != twin_first.handle and second.state != twin_first.state
    # Repaired: each namespace finds its own copy through the new path.
    assert t.open(alias).handle == first[0].handle
    again = t.nsopen(1, alias)
    assert (again.handle, again.state, again.lmid) == (first[1].handle, first[1].state, 1)
    ins = ldfix.inspect(t.pid)
    assert all(o.status is Status.OK for o in _libs(ins, lib))


def test_changed_library_on_glibc_231_is_left_alone(old_box: Chroot, old_fx: Fixtures) -> None:
    lib = old_box.lib()
    t = old_box.start()
    t.open(lib, mopen=True)
    shutil.copy2(old_fx.lib_v2, old_box.host(lib + ".new"))
    os.rename(old_box.host(lib + ".new"), old_box.host(lib))
    res = run_ldfix("fix", "--json", str(t.pid))
    assert res.returncode == 0, res.stderr
    (proc,) = json.loads(res.stdout)["processes"]
    assert proc["rewritten"] == []
    assert [s["status"] for s in proc["skipped"] if s["name"] == lib] == ["changed"]


def test_pldd_and_dump_list_the_same_objects_on_glibc_231(old_box: Chroot) -> None:
    """What pldd lists (namespace 0, as the target's loader sees it)."""
    if shutil.which("pldd") is None:
        pytest.skip("no pldd")
    lib = old_box.lib()
    t = old_box.start()
    t.open(lib)
    pldd = subprocess.run(["pldd", str(t.pid)], capture_output=True, text=True, timeout=30)
    if pldd.returncode != 0:
        pytest.skip(f"pldd failed: {pldd.stderr.strip()}")
    listed = {line.strip() for line in pldd.stdout.splitlines()[1:] if line.strip()}
    ins = ldfix.inspect(t.pid)
    names = {o.display_name for o in ins.objects if o.namespace == 0 and o.role != "main"}
    assert listed == names and lib in names


def test_table_rows_for_231_match_dwarf(bullseye: Path) -> None:
    """The 2.31-2.32 x86_64 row and the 2.17-2.31 _rtld_global row against
    bullseye's own DWARF (libc6-dbg), on every field ldfix reads, _dl_ns's
    stride and _ns_debug included (2.31 has no r_next chain: they are how the
    namespaces are found)."""
    dbg = debug_file(bullseye / "usr/lib/debug", elf_build_id(bullseye / "lib/x86_64-linux-gnu/ld-2.31.so"))
    if not dbg.exists():
        pytest.skip(f"no debug file for bullseye's ld.so at {dbg}")
    assert_table_matches_dwarf(dwarf_layout(dbg), VERSION, extra=("ns_debug",))
