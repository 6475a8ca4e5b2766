"""What every loader back-end produces for the inspection and the repair."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from ldfix.memory import Memory
from ldfix.model import Inspection, Record


class BusyField(NamedTuple):
    """A word that must be zero while no load is in flight."""

    address: int
    size: int
    label: str           # e.g. "namespace 0 r_state"
    owner_offset: int | None = None  # where the holder's tid is (mutexes)


class Analysis(Record):
    __slots__ = ("inspection", "busy_fields", "members")

    def __init__(self, inspection: Inspection, busy_fields: list[BusyField] | None = None,
                 members: Callable[[Memory], set[int]] | None = None) -> None:
        self.inspection = inspection
        self.busy_fields = busy_fields or []
        # Re-walks the lists (public fields only) and returns every object
        # address reachable now; the repair calls it under the freeze.
        self.members = members

    def busy(self, mem: Memory) -> str | None:
        """Why the loader is in the middle of a change, or None."""
        return busy_reason(mem, self.busy_fields)


def busy_reason(mem: Memory, fields: list[BusyField]) -> str | None:
    """Why the loader is in the middle of a change (one of `fields` is set), or None."""
    if not fields:
        return None
    regions = [(b.address, b.size) for b in fields]
    regions += [(b.address + b.owner_offset, 4) for b in fields if b.owner_offset is not None]
    data = mem.read_many(regions)
    extra = iter(data[len(fields):])
    for b, raw in zip(fields, data):
        owner = next(extra) if b.owner_offset is not None else b""
        if len(raw) != b.size:
            return f"{b.label} at 0x{b.address:x} unreadable"
        value = int.from_bytes(raw, "little")
        if value:
            if owner:
                return f"{b.label} held (by thread {int.from_bytes(owner, 'little')})"
            return f"{b.label} is {value} (a load or unload is in progress)"
    return None
