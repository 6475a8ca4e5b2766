"""One exception tree for everything ldfix reports.  OS errors are translated
into these at the boundaries (procfs, native calls); the CLI turns each into
one line and the exit code the class carries."""

from __future__ import annotations

import errno as _errno


class ExitCode:
    """Documented exit codes (README, "Exit codes")."""

    OK = 0
    PARTIAL = 1  # several targets: some failed, the others were handled
    USAGE = 2
    NO_PROCESS = 3  # no such process, or it exited during the run
    ACCESS = 4  # permission denied (ptrace / /proc/PID/mem)
    UNSUPPORTED = 5  # static binary, kernel thread, 32-bit, unknown loader
    UNVERIFIED = 6  # the loader's id layout could not be verified: nothing written
    CORRUPT = 7  # the loader's lists are corrupt or hostile
    STALE = 8  # `check`: stale ids remain
    BUSY = 9  # the loader stayed busy (dlopen in flight) through every retry
    WRITE_FAILED = 10  # a write did not read back as written
    INTERNAL = 70


class LdfixError(Exception):
    """Base of every error ldfix raises on purpose."""

    exit_code = ExitCode.INTERNAL

    def __init__(self, message: str, *, pid: int | None = None,
                 address: int | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.pid = pid
        self.address = address
        self.path = path

    def __str__(self) -> str:
        return self.message


class NoSuchProcess(LdfixError):
    exit_code = ExitCode.NO_PROCESS


class AccessDenied(LdfixError):
    exit_code = ExitCode.ACCESS


class UnsupportedTarget(LdfixError):
    exit_code = ExitCode.UNSUPPORTED


class LayoutUnverified(LdfixError):
    exit_code = ExitCode.UNVERIFIED


class CorruptTarget(LdfixError):
    """The target's loader data does not hold together (or is hostile)."""

    exit_code = ExitCode.CORRUPT


class MemoryFault(CorruptTarget):
    """A read or write at an address the target has not mapped."""

    def __init__(self, address: int, size: int, *, pid: int | None = None) -> None:
        super().__init__(f"bad address 0x{address:x} (+{size})", pid=pid, address=address)
        self.size = size


class LoaderBusy(LdfixError):
    exit_code = ExitCode.BUSY


class WriteFailed(LdfixError):
    exit_code = ExitCode.WRITE_FAILED


def from_oserror(exc: OSError, pid: int | None, what: str) -> LdfixError:
    """Translate an OSError met while touching process `pid`."""
    err = exc.errno
    where = f"pid {pid}" if pid is not None else "target"
    if err in (_errno.ESRCH, _errno.ENOENT):
        return NoSuchProcess(f"{where}: no such process ({what})", pid=pid)
    if err in (_errno.EPERM, _errno.EACCES):
        return AccessDenied(
            f"{where}: permission denied ({what}); ldfix needs root, or CAP_SYS_PTRACE plus "
            "CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN) for /proc/PID/map_files, and the target "
            "must not be traced by another debugger", pid=pid)
    return LdfixError(f"{where}: {what}: {exc.strerror or exc}", pid=pid)
