"""Debug files processed by dwz keep shared types, struct link_map among
them, in a supplementary file named by .gnu_debugaltlink (Fedora, Ubuntu).
Built here from the host's libc6-dbg files for ld.so and libc.so with dwz's
multifile mode; the layout must come out as from the original file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import Target, debug_file, dwarf_layout, elf_build_id, ldfix as run_ldfix
from ldfix.layout import dwarf_glibc_layout

HOST_DEBUG = Path("/usr/lib/debug")
LDSO = Path(os.path.realpath("/lib64/ld-linux-x86-64.so.2"))
LIBC = Path(os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6"))


@pytest.fixture(scope="module")
def dwz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DIR/.build-id/../<ld.so's id>.debug processed by dwz, its supplementary
    file at DIR/.dwz/common.debug, named relatively as distributions do."""
    if not (shutil.which("dwz") and shutil.which("objcopy")):
        pytest.skip("no dwz or objcopy (apt-get install dwz binutils)")
    originals = [debug_file(HOST_DEBUG, elf_build_id(p)) for p in (LDSO, LIBC)]
    if not all(p.exists() for p in originals):
        pytest.skip("no host libc6-dbg debug files for ld.so and libc.so")
    d = tmp_path_factory.mktemp("dwz")
    work = d / "work"
    work.mkdir()
    copies = []
    for name, src in zip(("ld.debug", "libc.debug"), originals):
        # dwz refuses compressed sections, which Debian's debug files have.
        subprocess.run(["objcopy", "--decompress-debug-sections", str(src), str(work / name)], check=True)
        copies.append(str(work / name))
    subprocess.run(["dwz", "-m", str(work / "common.debug"), "-M", "../../.dwz/common.debug", *copies],
                   check=True, capture_output=True)
    dbg = debug_file(d, elf_build_id(LDSO))
    dbg.parent.mkdir(parents=True)
    shutil.move(work / "ld.debug", dbg)
    (d / ".dwz").mkdir()
    shutil.move(work / "common.debug", d / ".dwz" / "common.debug")
    return d


def _open_from(base: Path):  # type: ignore[no-untyped-def]
    def opener(name: str) -> int | None:
        try:
            return os.open(os.path.normpath(base / name), os.O_RDONLY)
        except OSError:
            return None
    return opener


def test_dwz_debug_file_gives_the_original_layout(dwz_dir: Path) -> None:
    dbg = debug_file(dwz_dir, elf_build_id(LDSO))
    want = dwarf_layout(debug_file(HOST_DEBUG, elf_build_id(LDSO)))
    assert want is not None
    assert dwarf_layout(dbg) is None  # the premise: link_map moved to the supplementary file
    fd = os.open(dbg, os.O_RDONLY)
    try:
        assert dwarf_glibc_layout(fd, _open_from(dbg.parent)) == want
        assert dwarf_glibc_layout(fd, lambda name: None) is None  # supplementary file absent
    finally:
        os.close(fd)


def test_dwz_on_a_live_process(dwz_dir: Path, fx, libdir: Path) -> None:  # type: ignore[no-untyped-def]
    env = dict(os.environ, LDFIX_DEBUG_DIRS=str(dwz_dir), LDFIX_CACHE_DIR="")
    with Target([str(fx.target)]) as t:
        t.open(libdir / "libldfix_demo.so")
        doc = json.loads(run_ldfix("dump", "--json", str(t.pid), env=env).stdout)
        assert doc["loader"]["layout_source"] == "dwarf", doc["loader"]


def test_dwz_supplementary_file_with_another_build_id_is_not_used(dwz_dir: Path, fx, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A supplementary file is trusted only with the build-id its link names."""
    d = tmp_path / "debug"
    shutil.copytree(dwz_dir, d)
    other = d / ".dwz" / "common.debug"
    data = bytearray(other.read_bytes())
    bid = elf_build_id_of_sections(other)
    i = data.find(bid)
    data[i] ^= 0xFF  # the same DWARF, another build-id
    other.write_bytes(bytes(data))
    env = dict(os.environ, LDFIX_DEBUG_DIRS=str(d), LDFIX_CACHE_DIR="")
    with Target([str(fx.target)]) as t:
        doc = json.loads(run_ldfix("dump", "--json", str(t.pid), env=env).stdout)
        assert doc["loader"]["layout_source"] != "dwarf", doc["loader"]
        assert doc["loader"]["layout_source"] is not None  # structure+table still holds


def elf_build_id_of_sections(path: Path) -> bytes:
    from ldfix.layout import _section_build_id

    fd = os.open(path, os.O_RDONLY)
    try:
        bid = _section_build_id(fd)
    finally:
        os.close(fd)
    assert bid
    return bid
