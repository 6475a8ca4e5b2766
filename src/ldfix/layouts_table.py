"""Known glibc layouts (a prior, never enough alone to write).

Facts from ../shared/reference/loader-layouts.md (tables T1-T3): member
offsets of `struct link_map` and of `struct rtld_global`'s head, per glibc
release range and architecture.  `verified` names where a row was checked on
a real build here (DWARF or a live process); other rows are derived from the
glibc sources at the release tags.  Distributions backport loader patches, so
a row is trusted only together with another source that agrees."""

from __future__ import annotations

from typing import NamedTuple


class GlibcRow(NamedTuple):
    first: int          # first glibc 2.x minor the row covers
    last: int           # last minor (99: up to master)
    arch: str
    l_phdr: int
    l_phnum: int
    l_searchlist: int
    l_type: tuple[int, int]      # (byte, bit) of the 2-bit l_type field
    l_removed: tuple[int, int]   # (byte, bit)
    l_map_start: int
    l_map_end: int
    l_scope_max: int
    l_scope: int
    l_local_scope: int
    file_id: int
    verified: str = ""


# Public prefix, identical in every version and LP64 architecture.
L_ADDR, L_NAME, L_LD, L_NEXT, L_PREV, L_REAL, L_NS = 0, 8, 16, 24, 32, 40, 48

GLIBC_ROWS: tuple[GlibcRow, ...] = (
    # x86_64
    GlibcRow(17, 27, "x86_64", 672, 688, 696, (788, 0), (789, 5), 832, 840, 888, 896, 904, 920),
    GlibcRow(28, 30, "x86_64", 680, 696, 704, (796, 0), (797, 5), 840, 848, 896, 904, 912, 928),
    GlibcRow(31, 32, "x86_64", 680, 696, 704, (796, 0), (797, 5), 848, 856, 904, 912, 920, 936,
             verified="2.31 Debian 11: DWARF (libc6-dbg) and live processes (tests/test_old_glibc.py)"),
    GlibcRow(33, 34, "x86_64", 680, 696, 704, (796, 0), (797, 5), 856, 864, 912, 920, 928, 944),
    GlibcRow(35, 35, "x86_64", 680, 696, 704, (796, 0), (798, 1), 856, 864, 912, 920, 928, 944),
    GlibcRow(36, 38, "x86_64", 704, 720, 728, (820, 0), (822, 2), 880, 888, 936, 944, 952, 968,
             verified="2.36 Debian 12: DWARF (libc6-dbg) and live processes"),
    GlibcRow(39, 99, "x86_64", 736, 752, 760, (852, 0), (854, 2), 912, 920, 960, 968, 976, 992,
             verified="2.41 Debian 13: DWARF (libc6-dbg) and live processes (tests/test_other_glibc.py)"),
    # aarch64
    GlibcRow(17, 27, "aarch64", 672, 688, 696, (788, 0), (789, 5), 832, 840, 888, 896, 904, 920),
    GlibcRow(28, 29, "aarch64", 680, 696, 704, (796, 0), (797, 5), 840, 848, 896, 904, 912, 928),
    GlibcRow(30, 30, "aarch64", 728, 744, 752, (844, 0), (845, 5), 888, 896, 944, 952, 960, 976),
    GlibcRow(31, 34, "aarch64", 728, 744, 752, (844, 0), (845, 5), 896, 904, 952, 960, 968, 984),
    GlibcRow(35, 35, "aarch64", 728, 744, 752, (844, 0), (846, 1), 896, 904, 952, 960, 968, 984),
    GlibcRow(36, 38, "aarch64", 752, 768, 776, (868, 0), (870, 2), 920, 928, 976, 984, 992, 1008),
    GlibcRow(39, 99, "aarch64", 752, 768, 776, (868, 0), (870, 2), 920, 928, 968, 976, 984, 1000),
)


class RtldRow(NamedTuple):
    first: int
    last: int
    arch: str
    ns_size: int        # sizeof(struct link_namespaces); _dl_ns[i] at i * ns_size
    ns_debug: int | None  # offset of _ns_debug inside a link_namespaces entry
    nns: int            # _dl_nns
    load_lock: int      # _dl_load_lock (a recursive mutex; __lock at +0, __owner at +8)


RTLD_ROWS: tuple[RtldRow, ...] = (
    RtldRow(17, 31, "x86_64", 144, 104, 2304, 2312),
    RtldRow(32, 34, "x86_64", 152, 112, 2432, 2440),
    # 2.35+: the r_next chain is authoritative, and stable branches (2.41-12
    # Debian) moved _ns_debug out: never read it from the table there.
    RtldRow(35, 41, "x86_64", 160, None, 2560, 2568),
    RtldRow(42, 99, "x86_64", 112, None, 1792, 1800),
    RtldRow(17, 31, "aarch64", 152, 112, 2432, 2440),
    RtldRow(32, 34, "aarch64", 160, 120, 2560, 2568),
    RtldRow(35, 41, "aarch64", 168, None, 2688, 2696),
    RtldRow(42, 99, "aarch64", 120, None, 1920, 1928),
)


def _minor(version: str | None) -> int | None:
    if not version:
        return None
    parts = version.split(".")
    if len(parts) < 2 or parts[0] != "2" or not parts[1].isdigit():
        return None
    return int(parts[1])


def glibc_row(version: str | None, arch: str) -> GlibcRow | None:
    minor = _minor(version)
    if minor is None:
        return None
    for row in GLIBC_ROWS:
        if row.arch == arch and row.first <= minor <= row.last:
            return row
    return None


def rtld_row(version: str | None, arch: str) -> RtldRow | None:
    minor = _minor(version)
    if minor is None:
        return None
    for row in RTLD_ROWS:
        if row.arch == arch and row.first <= minor <= row.last:
            return row
    return None
