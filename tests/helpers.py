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
import shlex
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURE_SRC = REPO / "csrc" / "fixtures"
DEBUG_DIR = "usr/lib/debug"
TRIXIE_ROOT = Path(os.environ.get("LDFIX_TEST_TRIXIE", "/var/cache/ldfix-tests/trixie"))
BULLSEYE_ROOT = Path(os.environ.get("LDFIX_TEST_BULLSEYE", "/var/cache/ldfix-tests/bullseye"))


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

    def nsopen(self, lmid: int, path: str | Path) -> Opened:
        """dlmopen(lmid, path): into the existing namespace lmid."""
        reply = self.cmd(f"nsopenx {lmid} {os.fsencode(path).hex()}")
        m = _OPEN_RE.match(reply)
        if not m:
            raise RuntimeError(f"dlmopen failed: {reply}")
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


class FifoTarget(Target):
    """A target started by another target (`serve` / `spawn`), spoken to over FIFOs."""

    def __init__(self, parent: Target, verb: str, fifo_dir: Path, prog: Path | None = None,
                 timeout: float = 20.0) -> None:
        fifo_dir.mkdir(parents=True, exist_ok=True)
        n = len(list(fifo_dir.glob("in*")))
        fin, fout = fifo_dir / f"in{n}", fifo_dir / f"out{n}"
        os.mkfifo(fin)
        os.mkfifo(fout)
        args = f"{prog} {fin} {fout}" if prog else f"{fin} {fout}"
        reply = parent.cmd(f"{verb} {args}")
        if not reply.startswith("ok pid="):
            raise RuntimeError(f"{verb} failed: {reply}")
        self.child_pid = int(reply.split("=")[1])
        self.timeout = timeout
        self._buf = b""
        self._w = open(fin, "wb", buffering=0)
        self._r = os.open(fout, os.O_RDONLY)
        self.proc = None  # type: ignore[assignment]
        line = self.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"child target did not start: {line!r}")
        self.pid = int(line.split()[1])

    def readline(self) -> str:
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("child target did not answer")
            chunk = os.read(self._r, 4096)
            if not chunk:
                raise EOFError("child target exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def cmd(self, line: str) -> str:
        self._w.write(line.encode() + b"\n")
        return self.readline()

    def alive(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:
            return False

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass
        self._w.close()
        os.close(self._r)


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


def _mounts() -> list[str]:
    """Mount points of the caller's (the host's) mount namespace."""
    with open("/proc/self/mountinfo", "rb") as f:
        return [line.split()[4].decode("unicode_escape") for line in f]


@dataclass
class Chroot:
    """A scratch directory inside the root, holding the fixture programs, and
    the targets started in it (always reaped by the fixture's teardown)."""

    root: Path
    inner: str                       # the scratch directory as the target sees it
    fx: Fixtures
    targets: list[Target] = field(default_factory=list)

    @property
    def host_dir(self) -> Path:
        return self.root / self.inner.lstrip("/")

    def host(self, inner: str) -> Path:
        """Where a path inside the root is, seen from the host."""
        return self.root / inner.lstrip("/")

    def lib(self, sub: str = "lib") -> str:
        return f"{self.inner}/{sub}/{self.fx.lib.name}"

    def start(self, *, hide_debug: bool = False, tmpfs_libdir: str | None = None) -> Target:
        """Run ldfix-target chrooted in the root, in a private mount namespace.

        hide_debug: an empty tmpfs over ROOT/usr/lib/debug first, so that the
          target's root holds no debug files.
        tmpfs_libdir: a directory (inside the scratch directory) made a tmpfs
          holding a copy of the demo library."""
        q = shlex.quote
        steps = ["set -e"]
        if hide_debug:
            steps.append(f"mount -t tmpfs -o size=1m,mode=755 ldfix-no-debug {q(str(self.host(DEBUG_DIR)))}")
        if tmpfs_libdir is not None:
            d = self.host_dir / tmpfs_libdir
            d.mkdir(exist_ok=True)
            steps.append(f"mount -t tmpfs -o size=16m ldfix-before {q(str(d))}")
            steps.append(f"cp {q(str(self.fx.lib))} {q(str(d))}/")
        steps.append(f"exec chroot {q(str(self.root))} {q(self.inner + '/' + self.fx.target.name)}")
        t = Target(["unshare", "-m", "--propagation", "private", "sh", "-c", "; ".join(steps)])
        self.targets.append(t)
        # unshare, sh and chroot all exec: the process we started is the target.
        assert t.pid == t.proc.pid
        assert os.readlink(f"/proc/{t.pid}/root") == str(self.root)
        return t

    def leftovers(self) -> list[int]:
        """Pids of processes still running a program from the scratch directory."""
        out = []
        prefix = str(self.host_dir) + "/"
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                exe = os.readlink(f"/proc/{entry}/exe")
            except OSError:
                continue
            if exe.startswith(prefix):
                out.append(int(entry))
        return out


@contextmanager
def chroot_box(trixie: Path, fx: Fixtures) -> Iterator[Chroot]:
    """A scratch directory inside the root with the fixture programs; every
    target started in it is reaped, and no mount may leak to the host."""
    root = trixie.resolve()  # as /proc/PID/root shows it
    host_dir = Path(tempfile.mkdtemp(prefix="ldfix-test-", dir=root / "tmp"))
    os.chmod(host_dir, 0o755)
    c = Chroot(root, "/" + str(host_dir.relative_to(root)), fx)
    try:
        shutil.copy2(fx.target, host_dir / fx.target.name)
        (host_dir / "lib").mkdir()
        shutil.copy2(fx.lib, host_dir / "lib" / fx.lib.name)
        yield c
    finally:
        for t in c.targets:
            t.kill()
        # Each target was alone in its mount namespace: killing it took its
        # mounts with it.  Anything still running from here was started by us.
        stray = c.leftovers()
        for pid in stray:
            os.kill(pid, signal.SIGKILL)
        host_mounts = [m for m in _mounts() if m == str(host_dir) or m.startswith(str(host_dir) + "/")
                       or m == str(c.host(DEBUG_DIR))]
        shutil.rmtree(host_dir, ignore_errors=True)
        assert not stray, f"processes left running from {host_dir}: {stray}"
        assert not host_mounts, f"mounts leaked into the host's namespace: {host_mounts}"


# --- ELF and DWARF facts of files on the host ---------------------------------------------

def elf_build_id(path: Path) -> bytes:
    """The GNU build-id of an ELF file (asserted present)."""
    from ldfix.elf import ElfFile

    fd = os.open(path, os.O_RDONLY)
    try:
        bid = ElfFile(fd, os.fstat(fd).st_size).build_id()
    finally:
        os.close(fd)
    assert bid, f"{path} has no build-id"
    return bid


def debug_file(base: Path, build_id: bytes) -> Path:
    """Where a debug file for `build_id` sits below a debug directory."""
    h = build_id.hex()
    return base / ".build-id" / h[:2] / f"{h[2:]}.debug"


def dwarf_layout(debug: Path):  # type: ignore[no-untyped-def]
    """The glibc layout ldfix reads from a debug file's DWARF."""
    from ldfix.layout import dwarf_glibc_layout

    fd = os.open(debug, os.O_RDONLY)
    try:
        return dwarf_glibc_layout(fd)
    finally:
        os.close(fd)


ROW_FIELDS = ("file_id", "l_real", "l_ns", "l_phdr", "l_phnum", "l_map_start", "l_map_end",
              "l_type", "l_removed", "l_local_scope", "ns_size", "nns", "load_lock")


def assert_table_matches_dwarf(dwarf, version: str, extra: tuple[str, ...] = ()) -> None:  # type: ignore[no-untyped-def]
    """The layout table's x86_64 rows for `version` agree with a DWARF layout
    on every field ldfix reads (and `extra` ones)."""
    from ldfix import layouts_table as table
    from ldfix.layout import layout_from_row

    assert dwarf is not None
    row, rrow = table.glibc_row(version, "x86_64"), table.rtld_row(version, "x86_64")
    assert row is not None and rrow is not None and row.verified.startswith(version)
    tab = layout_from_row(row, rrow)
    fields = ROW_FIELDS + extra
    assert {f: getattr(dwarf, f) for f in fields} == {f: getattr(tab, f) for f in fields}

