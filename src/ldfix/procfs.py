"""A target process as /proc shows it: auxv, maps, exe header, threads, root.

OS errors are translated into ldfix errors here, at one boundary."""

from __future__ import annotations

import errno
import os
import struct
from typing import NamedTuple
from functools import cached_property

from ldfix.errors import LdfixError, NoSuchProcess, UnsupportedTarget, from_oserror

AT_NULL, AT_PHDR, AT_PHENT, AT_PHNUM, AT_BASE, AT_ENTRY = 0, 3, 4, 5, 7, 9
AT_SYSINFO_EHDR = 33



class Mapping(NamedTuple):
    start: int
    end: int
    perms: str
    offset: int
    dev: int  # user-space st_dev encoding (os.makedev)
    ino: int
    path: bytes  # as the kernel prints it, relative to ldfix's own root

    @property
    def is_file(self) -> bool:
        return self.ino != 0 and self.path.startswith(b"/")


def parse_maps(text: bytes) -> list[Mapping]:
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        try:
            lo, _, hi = parts[0].partition(b"-")
            major, _, minor = parts[3].partition(b":")
            out.append(Mapping(int(lo, 16), int(hi, 16), parts[1].decode(), int(parts[2], 16),
                               os.makedev(int(major, 16), int(minor, 16)), int(parts[4]),
                               parts[5] if len(parts) > 5 else b""))
        except ValueError:
            continue
    return out


DEAD_STATES = (b"Z", b"X", b"x")  # zombie, dead


def stat_fields(task_dir: str) -> list[bytes]:
    """The fields of TASK_DIR/stat after the command name (state first);
    [] when it cannot be read (the task is gone)."""
    try:
        with open(f"{task_dir}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return []


class Process:
    """The /proc view of one process (thread group)."""

    def __init__(self, pid: int, proc: str = "/proc") -> None:
        if not isinstance(pid, int) or pid <= 0:
            raise NoSuchProcess(f"pid {pid!r}: not a process id", pid=None)
        self.pid = pid
        self.proc = proc
        self.dir = f"{proc}/{pid}"
        status = self._read("status").decode(errors="replace")
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        self.tgid = int(fields.get("Tgid", str(pid)).strip())
        if self.tgid != pid:
            # A thread id was given: work on its thread group.
            self.pid = self.tgid
            self.dir = f"{proc}/{self.tgid}"
        self.name = fields.get("Name", "").strip()
        if fields.get("State", "").strip().startswith(("Z", "X")):
            raise NoSuchProcess(f"pid {pid}: exited (zombie, not yet reaped)", pid=pid)
        if fields.get("Kthread", "0").strip() == "1":
            raise UnsupportedTarget(f"pid {pid}: kernel thread, no user-space loader", pid=pid)

    _pidfd: int | None = None
    _start: bytes | None = None

    def pin(self) -> None:
        """Pin the process: from then on still_same() tells whether self.pid
        names this very process, not one that got its pid after it exited.
        A pidfd where the kernel gives one (Linux 5.3+; not under a seccomp
        filter refusing pidfd_open), else its start time."""
        if self._pidfd is not None or self._start is not None:
            return
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            raise NoSuchProcess(f"pid {self.pid}: no such process", pid=self.pid) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.EACCES):
                raise from_oserror(exc, self.pid, "pidfd_open") from None
        self._start = self._starttime()
        if self._start is None:
            raise NoSuchProcess(f"pid {self.pid}: exited during the run", pid=self.pid)

    def _starttime(self) -> bytes | None:
        fields = stat_fields(self.dir)
        return fields[19] if len(fields) > 19 else None  # field 22 of stat: starttime

    def still_same(self) -> bool:
        """Whether the pinned process still exists (as a zombie too: its pid
        cannot be taken before it is reaped); False once another may hold its pid."""
        if self._pidfd is not None:
            import signal
            try:
                signal.pidfd_send_signal(self._pidfd, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass  # it exists
            return True
        if self._start is not None:
            return self._starttime() == self._start
        return self.alive()

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def _read(self, name: str) -> bytes:
        try:
            with open(f"{self.dir}/{name}", "rb") as f:
                return f.read()
        except OSError as exc:
            raise from_oserror(exc, self.pid, f"read /proc/PID/{name}") from None

    def alive(self) -> bool:
        fields = stat_fields(self.dir)
        return bool(fields) and fields[0] not in DEAD_STATES

    @cached_property
    def auxv(self) -> dict[int, int]:
        raw = self._read("auxv")
        if not raw:
            # Kernel threads were refused already (Kthread): a user process
            # without an auxv has let go of its memory, it is exiting.
            raise NoSuchProcess(f"pid {self.pid}: exited during the run (no auxiliary vector)",
                                pid=self.pid)
        out: dict[int, int] = {}
        for i in range(0, len(raw) - 15, 16):
            key, val = struct.unpack_from("<QQ", raw, i)
            if key == AT_NULL:
                break
            out.setdefault(key, val)
        return out

    def maps_raw(self) -> bytes:
        return self._read("maps")

    @cached_property
    def exe_header(self) -> bytes:
        """The first bytes of the executable, read through /proc/PID/exe."""
        try:
            with open(f"{self.dir}/exe", "rb") as f:
                return f.read(64)
        except OSError as exc:
            if exc.errno == errno.ENOENT and os.path.exists(self.dir):
                raise UnsupportedTarget(f"pid {self.pid}: no executable (kernel thread or zombie)",
                                        pid=self.pid) from None
            raise from_oserror(exc, self.pid, "open /proc/PID/exe") from None

    def tasks(self) -> list[int]:
        try:
            return sorted(int(t) for t in os.listdir(f"{self.dir}/task"))
        except OSError as exc:
            raise from_oserror(exc, self.pid, "list threads") from None

    def task_status(self, tid: int) -> dict[str, str]:
        try:
            with open(f"{self.dir}/task/{tid}/status", "rb") as f:
                text = f.read().decode(errors="replace")
        except OSError:
            return {}
        return {k: v.strip() for k, v in
                (line.split(":", 1) for line in text.splitlines() if ":" in line)}

    def open_root(self) -> int:
        """An O_PATH descriptor of the process's root directory (its filesystem view)."""
        try:
            return os.open(f"{self.dir}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise from_oserror(exc, self.pid, "open /proc/PID/root") from None

    def readlink(self, name: str) -> str | None:
        try:
            return os.readlink(f"{self.dir}/{name}")
        except OSError:
            return None

    def map_file_path(self, m: Mapping) -> str:
        return f"{self.dir}/map_files/{m.start:x}-{m.end:x}"


def check_target(proc: Process) -> None:
    """Refuse what ldfix cannot work on, with a reason."""
    hdr = proc.exe_header
    if len(hdr) < 20 or hdr[:4] != b"\x7fELF":
        raise UnsupportedTarget(f"pid {proc.pid}: executable is not ELF", pid=proc.pid)
    if hdr[4] != 2:
        raise UnsupportedTarget(f"pid {proc.pid}: 32-bit process (only 64-bit targets are supported)",
                                pid=proc.pid)
    if hdr[5] != 1:
        raise UnsupportedTarget(f"pid {proc.pid}: big-endian process", pid=proc.pid)
    machine = struct.unpack_from("<H", hdr, 18)[0]
    if machine not in (62, 183):
        raise UnsupportedTarget(f"pid {proc.pid}: unsupported machine {machine}", pid=proc.pid)


def arch_name(proc: Process) -> str:
    machine = struct.unpack_from("<H", proc.exe_header, 18)[0]
    return {62: "x86_64", 183: "aarch64"}.get(machine, f"machine-{machine}")


__all__ = ["Mapping", "Process", "parse_maps", "check_target", "arch_name", "LdfixError"]
