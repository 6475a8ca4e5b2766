"""Smoke tests of the built native module (ldfix._native) through ldfix.native."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldfix import native


def test_module_loads_and_reads_own_memory() -> None:
    buf = ctypes.create_string_buffer(b"ldfix-native-smoke")
    addr = ctypes.addressof(buf)
    fd = os.open(f"/proc/{os.getpid()}/mem", os.O_RDONLY)
    try:
        got = native.vm_read(os.getpid(), fd, [(addr, 18), (8, 16), (addr + 6, 6)])
    finally:
        os.close(fd)
    assert got == [b"ldfix-native-smoke", b"", b"native"]  # the unmapped region comes back empty


def test_errors_are_oserrors_with_errno() -> None:
    with pytest.raises(OSError) as info:
        native.vm_read(2**22 + 12345, -1, [(0x1000, 8)])  # no such pid
    assert info.value.errno == errno.ESRCH
    with pytest.raises(OSError) as info2:
        native.ptrace_seize(os.getpid())  # a process cannot trace itself
    assert info2.value.errno == errno.EPERM


def test_open_in_root_stays_inside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "inside").write_text("in")
    (root / "escape").symlink_to("/etc")          # absolute symlink: resolved inside the root
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        for path in (b"/etc/inside", b"../../../etc/inside", b"/escape/inside"):
            fd = native.open_in_root(rootfd, path)
            rfd = native.open_regular(fd)
            assert os.read(rfd, 10) == b"in"
            os.close(rfd)
            os.close(fd)
        with pytest.raises(OSError):
            native.open_in_root(rootfd, b"/escape/passwd")  # the host's /etc/passwd is not reachable
        dfd = native.open_in_root(rootfd, b"/etc")
        with pytest.raises(OSError) as info:
            native.open_regular(dfd)  # a directory is not opened for reading
        assert info.value.errno == errno.EINVAL
        os.close(dfd)
    finally:
        os.close(rootfd)


def test_ptrace_seize_interrupt_wait_detach() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.01)"])
    try:
        native.ptrace_seize(child.pid)
        native.ptrace_interrupt(child.pid)
        pid, status = native.waitpid(child.pid)
        assert pid == child.pid and os.WIFSTOPPED(status)
        with open(f"/proc/{child.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "t"
        native.ptrace_detach(child.pid)
        time.sleep(0.05)
        with open(f"/proc/{child.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] != "t"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
