from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import BULLSEYE_ROOT, TRIXIE_ROOT, Chroot, Fixtures, Target, build_fixtures, chroot_box


@pytest.fixture(scope="session")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Fixtures:
    """Fixture programs for the host glibc, compiled once per run."""
    return build_fixtures(tmp_path_factory.mktemp("fixtures-glibc"))


@pytest.fixture(scope="session")
def fx_musl(tmp_path_factory: pytest.TempPathFactory) -> Fixtures:
    cc = shutil.which("musl-gcc")
    if cc is None:
        pytest.skip("no musl-gcc (apt-get install musl-tools)")
    return build_fixtures(tmp_path_factory.mktemp("fixtures-musl"), cc=cc)


@pytest.fixture(scope="session")
def trixie() -> Path:
    if not (TRIXIE_ROOT / "usr/lib/x86_64-linux-gnu/libc.so.6").exists():
        pytest.skip(f"no Debian trixie root at {TRIXIE_ROOT} (scripts/make-test-roots builds it)")
    return TRIXIE_ROOT


@pytest.fixture(scope="session")
def bullseye() -> Path:
    """Debian 11: glibc 2.31 (with gcc), musl 1.2.2."""
    if not (BULLSEYE_ROOT / "lib/x86_64-linux-gnu/libc.so.6").exists():
        pytest.skip(f"no Debian bullseye root at {BULLSEYE_ROOT} (scripts/make-test-roots builds it)")
    return BULLSEYE_ROOT.resolve()


@pytest.fixture
def old_musl_box(bullseye: Path, fx_musl: Fixtures) -> Iterator[Chroot]:
    """musl fixture programs inside the bullseye root (musl 1.2.2)."""
    if not (bullseye / "lib/ld-musl-x86_64.so.1").exists():
        pytest.skip(f"no musl in {bullseye} (rebuild it with scripts/make-test-roots)")
    with chroot_box(bullseye, fx_musl) as c:
        yield c


@pytest.fixture
def libdir(tmp_path: Path, fx: Fixtures) -> Path:
    """A directory holding a private copy of the demo library."""
    d = tmp_path / "lib"
    d.mkdir()
    shutil.copy2(fx.lib, d / "libldfix_demo.so")
    return d


@pytest.fixture
def target(fx: Fixtures) -> Iterator[Target]:
    with Target([str(fx.target)]) as t:
        yield t


@pytest.fixture
def box(trixie: Path, fx: Fixtures) -> Iterator[Chroot]:
    """glibc fixture programs inside the trixie root (glibc 2.41)."""
    with chroot_box(trixie, fx) as c:
        yield c


@pytest.fixture
def musl_box(trixie: Path, fx_musl: Fixtures) -> Iterator[Chroot]:
    """musl fixture programs inside the trixie root (musl 1.2.5)."""
    with chroot_box(trixie, fx_musl) as c:
        yield c
