"""The public data model: what `ldfix.inspect` and `ldfix.fix` return."""

from __future__ import annotations

import struct
from enum import Enum
from typing import Any, NamedTuple


class Record:
    """A plain mutable record: __slots__, __repr__ and __eq__ from the slots.

    Used instead of dataclasses on the start-up path: importing dataclasses
    and generating each class cost ~30 ms per run (see BENCHMARKS.md)."""

    __slots__: tuple[str, ...] = ()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


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


class FileId(NamedTuple):
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


class LoadedObject(Record):
    """One loaded object as the loader keeps it (a glibc link_map, a musl dso)."""

    __slots__ = ("namespace", "name", "role", "address", "base", "map_start", "map_end", "stored",
                 "id_address", "current", "status", "reason", "writable")

    def __init__(self, namespace: int, name: bytes, role: str, address: int, base: int,
                 map_start: int | None = None, map_end: int | None = None,
                 stored: FileId | None = None, id_address: int | None = None,
                 current: FileId | None = None, status: Status = Status.UNKNOWN,
                 reason: str = "", writable: bool = False) -> None:
        self.namespace = namespace
        self.name = name              # the path the loader recorded (raw bytes from the target)
        self.role = role              # main | loader | vdso | library | proxy
        self.address = address        # of the link_map / dso itself
        self.base = base              # load bias (l_addr / dso->base)
        self.map_start = map_start
        self.map_end = map_end
        self.stored = stored
        self.id_address = id_address  # where `stored` lives in the target
        self.current = current
        self.status = status
        self.reason = reason
        self.writable = writable      # passed every check that allows a write of its id

    @property
    def display_name(self) -> str:
        return self.name.decode("utf-8", "backslashreplace")


class LoaderInfo(Record):
    __slots__ = ("kind", "version", "arch", "layout_source", "layout_error", "interpreter", "lock_check")

    def __init__(self, kind: str, version: str | None, arch: str, layout_source: str | None,
                 layout_error: str | None = None, interpreter: str | None = None,
                 lock_check: str = "") -> None:
        self.kind = kind                    # glibc | musl
        self.version = version
        self.arch = arch
        self.layout_source = layout_source  # e.g. "dwarf", "structure+table"; None when unverified
        self.layout_error = layout_error
        self.interpreter = interpreter
        self.lock_check = lock_check        # how a load in flight is detected


class Inspection(Record):
    """Everything `ldfix dump` shows for one process."""

    __slots__ = ("pid", "loader", "objects", "partial", "warnings", "busy")

    def __init__(self, pid: int, loader: LoaderInfo, objects: list[LoadedObject], partial: bool = False,
                 warnings: list[str] | None = None, busy: str | None = None) -> None:
        self.pid = pid
        self.loader = loader
        self.objects = objects
        self.partial = partial
        self.warnings = warnings if warnings is not None else []
        self.busy = busy  # the loader was mid-change when the layout failed to verify

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Status}
        for o in self.objects:
            out[o.status.value] += 1
        return {k: v for k, v in out.items() if v}

    def namespaces(self) -> list[int]:
        return sorted({o.namespace for o in self.objects})
