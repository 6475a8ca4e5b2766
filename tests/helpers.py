"""Test plumbing: build the C fixtures, run real target processes with a
readiness handshake, always reap them, and simulate restores."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURE_SRC = REPO / "csrc" / "fixtures"
TRIXIE_ROOT = Path(os.environ.get("LDFIX_TEST_TRIXIE", "/var/cache/ldfix-tests/trixie"))


@dataclass
class Fixtures:
    target: Path
    lib: Path      # libldfix_demo.so, variant 1
    lib_v2: Path   # same soname, other content (another build-id)
    cc: str


def build_fixtures(outdir: Path, cc: str = "gcc") -> Fixtures:
    outdir.mkdir(parents=True, exist_ok=True)
    target = outdir / "ldfix-target"
    lib = outdir / "libldfix_demo.so"
    lib_v2 = outdir / "libldfix_demo_v2.so"
    subprocess.run([cc, "-O2", "-Wall", "-rdynamic", "-o", str(target),
                    str(FIXTURE_SRC / "target.c"), "-ldl", "-lpthread"], check=True)
    for variant, out in ((1, lib), (2, lib_v2)):
        subprocess.run([cc, "-O2", "-Wall", "-shared", "-fPIC", "-Wl,--build-id",
                        "-Wl,-soname,libldfix_demo.so", f"-DLDFIX_DEMO_VARIANT={variant}",
                        "-o", str(out), str(FIXTURE_SRC / "libdemo.c")], check=True)
    return Fixtures(target, lib, lib_v2, cc)


@dataclass
class Opened:
    handle: int
    state: int
    ctors: int
    lmid: int


_OPEN_RE = re.compile(r"ok handle=(\S+) state=(\S+) ctors=(\d+) lmid=(-?\d+)")


class Target:
    """A running ldfix-target (or any program speaking its protocol)."""

    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None,
                 cwd: str | None = None, timeout: float = 20.0) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, cwd=cwd, bufsize=0)
        self.timeout = timeout
        self._buf = b""
        line = self.readline()
        m = re.match(r"ready (\d+)", line)
        if not m:
            self.kill()
            raise RuntimeError(f"target did not start: {line!r}")
        self.pid = int(m.group(1))

    def readline(self) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("target did not answer")
            r, _, _ = select.select([self.proc.stdout], [], [], left)
            if r:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise EOFError(f"target exited (status {self.proc.poll()})")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def cmd(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        return self.readline()

    def open(self, path: str | Path, mopen: bool = False) -> Opened:
        reply = self.cmd(f"{'mopenx' if mopen else 'openx'} {os.fsencode(path).hex()}")
        m = _OPEN_RE.match(reply)
        if not m:
            raise RuntimeError(f"dlopen failed: {reply}")
        return Opened(int(m.group(1), 16), int(m.group(2), 16), int(m.group(3)), int(m.group(4)))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def replace_with_copy(path: Path) -> None:
    """Simulated restore (a): the same bytes under the same path, a new inode.

    The old inode stays linked under another name, so that a later copy can
    never be given the old inode number again (the file system reuses freed
    inode numbers, which would make the new file look like the old one)."""
    tmp = path.with_name(path.name + ".restored")
    shutil.copy2(path, tmp)
    n = 0
    while path.with_name(f"{path.name}.old{n}").exists():
        n += 1
    os.link(path, path.with_name(f"{path.name}.old{n}"))
    os.rename(tmp, path)


def remount_fresh_tmpfs(pid: int, directory: Path, sources: list[Path]) -> None:
    """Simulated restore (b): in the target's mount namespace, a fresh tmpfs
    holding byte-identical copies replaces `directory` (new device and inodes)."""
    script = (f"set -e; mount -t tmpfs -o size=64m ldfix-restore {directory}; " +
              "; ".join(f"cp {s} {directory}/{s.name}" for s in sources))
    subprocess.run(["nsenter", "-t", str(pid), "-m", "sh", "-c", script], check=True)


def ldfix(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the installed CLI the way a user does (python -m ldfix)."""
    return subprocess.run([sys.executable, "-m", "ldfix", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
