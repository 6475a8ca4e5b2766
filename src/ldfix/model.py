"""The public data model: what `ldfix.inspect` and `ldfix.fix` return."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import Enum


class Status(str, Enum):
    OK = "ok"            # stored id equals the file's current id
    STALE = "stale"      # differs, and the file holds what is mapped: to repair
    CHANGED = "changed"  # differs, and the file now holds other content: never repointed
    MISSING = "missing"  # no such file inside the process's root
    UNSET = "unset"      # the loader stored no id (all zero): left alone
    VIRTUAL = "virtual"  # no file behind it (vdso)
    UNKNOWN = "unknown"  # the id layout could not be verified: ids not read

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class FileId:
    """A (st_dev, st_ino) pair; dev in the user-space encoding that stat() returns."""

    dev: int
    ino: int

    @classmethod
    def unpack(cls, data: bytes) -> FileId:
        dev, ino = struct.unpack("<QQ", data)
        return cls(dev, ino)

    def pack(self) -> bytes:
        return struct.pack("<QQ", self.dev, self.ino)

    @property
    def is_zero(self) -> bool:
        return self.dev == 0 and self.ino == 0

    def __str__(self) -> str:
        major = ((self.dev >> 8) & 0xFFF) | ((self.dev >> 32) & ~0xFFF)
        minor = (self.dev & 0xFF) | ((self.dev >> 12) & ~0xFF)
        return f"{major:x}:{minor:02x}:{self.ino}"

    def as_json(self) -> dict[str, int]:
        return {"dev": self.dev, "ino": self.ino}


@dataclass
class LoadedObject:
    """One loaded object as the loader keeps it (a glibc link_map, a musl dso)."""

    namespace: int
    name: bytes              # the path the loader recorded (raw bytes from the target)
    role: str                # main | loader | vdso | library | proxy
    address: int             # of the link_map / dso itself
    base: int                # load bias (l_addr / dso->base)
    map_start: int | None = None
    map_end: int | None = None
    stored: FileId | None = None
    id_address: int | None = None    # where `stored` lives in the target
    current: FileId | None = None
    status: Status = Status.UNKNOWN
    reason: str = ""
    writable: bool = False   # passed every check that allows a write of its id

    @property
    def display_name(self) -> str:
        return self.name.decode("utf-8", "backslashreplace")


@dataclass
class LoaderInfo:
    kind: str                      # glibc | musl
    version: str | None
    arch: str
    layout_source: str | None      # e.g. "dwarf", "structure+table"; None when unverified
    layout_error: str | None = None
    interpreter: str | None = None
    lock_check: str = ""           # how a load in flight is detected


@dataclass
class Inspection:
    """Everything `ldfix dump` shows for one process."""

    pid: int
    loader: LoaderInfo
    objects: list[LoadedObject]
    partial: bool = False
    warnings: list[str] = field(default_factory=list)
    busy: str | None = None  # the loader was mid-change when the layout failed to verify

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Status}
        for o in self.objects:
            out[o.status.value] += 1
        return {k: v for k, v in out.items() if v}

    def namespaces(self) -> list[int]:
        return sorted({o.namespace for o in self.objects})
