"""Debug logging that costs nothing until asked for: `logging` itself is
imported only when the CLI's -v is given (it costs ~10 ms of every run)."""

from __future__ import annotations

from typing import Any

_level: int | None = None


class _Logger:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def _emit(self, level: int, msg: str, args: tuple[Any, ...]) -> None:
        if _level is not None and level >= _level:
            import logging
            logging.getLogger(self.name).log(level, msg, *args)

    def debug(self, msg: str, *args: Any) -> None:
        self._emit(10, msg, args)

    def info(self, msg: str, *args: Any) -> None:
        self._emit(20, msg, args)

    def warning(self, msg: str, *args: Any) -> None:
        self._emit(30, msg, args)


def getLogger(name: str) -> _Logger:  # noqa: N802 - mirrors logging.getLogger
    return _Logger(name)


def enable(level: int) -> None:
    """Route ldfix's messages at `level` and above to stderr."""
    global _level
    import logging
    logging.basicConfig(level=level, format="ldfix: %(name)s: %(message)s")
    _level = level
