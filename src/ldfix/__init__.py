"""ldfix: repair the dynamic loader's stale file ids in live processes after a
checkpoint/restore, so that dlopen() of an already-loaded file through another
path finds the loaded object again instead of loading a second copy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["inspect", "fix", "Inspection", "LoadedObject", "FileId", "Status", "LdfixError"]

if TYPE_CHECKING:
    from ldfix.api import inspect
    from ldfix.errors import LdfixError
    from ldfix.model import FileId, Inspection, LoadedObject, Status
    from ldfix.repair import fix


def __getattr__(name: str) -> Any:
    # Lazy: `import ldfix` stays cheap (the CRIU hook and the CLI import only what they use).
    if name == "inspect":
        from ldfix.api import inspect
        return inspect
    if name == "fix":
        from ldfix.repair import fix
        return fix
    if name in ("Inspection", "LoadedObject", "FileId", "Status"):
        from ldfix import model
        return getattr(model, name)
    if name == "LdfixError":
        from ldfix.errors import LdfixError
        return LdfixError
    raise AttributeError(name)
