"""Confinement: ldfix runs as root on the host, and the names it resolves and
the processes it reads belong to someone else.

1. Path confinement.  A real target, chrooted into a small root of its own
   (private mount namespace, /proc mounted inside), dlopen()s libraries
   through names that would leave that root if resolved the naive way
   (`/proc/PID/root/NAME`): `../` runs, absolute symlinks to host paths, a
   relative name, a name near PATH_MAX, control characters, /proc/self/root
   and /proc/<a host pid>/root.  A canary tree on the host sits exactly where
   each name would escape to.  Three detectors watch it:
     - the atime of a symlink every escape path must cross (any lookup through
       it, even an O_PATH open or a stat, or a failed lookup, updates it);
     - inotify on the canary files and directories (any open or read);
     - the ids ldfix reports: a host file's (dev, ino) would show up.
   Each detector is first shown to fire on the naive resolution of each name
   (so the test cannot pass vacuously), then ldfix dump/fix/check run and
   none fires; the in-root files are repaired, names print escaped.  Debug
   files planted in the target's root (symlinks to the host, FIFOs, garbage,
   corrupt DWARF, a decompression bomb) are the other path-borne input.
2. Privilege: ldfix as an unprivileged user, and with too few capabilities.
3. ldfix and pid namespaces (and a user namespace): what works.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import Fixtures, Target, debug_file, elf_build_id, replace_with_copy

from ldfix.errors import ExitCode
from ldfix.report import escape

OLD_TIME = 946684800  # 2000-01-01: older than the symlink's ctime, so the next follow updates atime
RUN_TIMEOUT = 60


# --- running the CLI, and what its output may contain -------------------------------------

@dataclass
class Run:
    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float


def run_cli(*args: str, prefix: list[str] | None = None, python: str = sys.executable,
            env: dict[str, str] | None = None, cwd: str | None = None) -> Run:
    argv = [*(prefix or []), python, "-m", "ldfix", *args]
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, env=env, cwd=cwd, timeout=RUN_TIMEOUT, check=False)
    return Run(argv, p.returncode, p.stdout, p.stderr, time.monotonic() - t0)


_RAW_CONTROL = re.compile(rb"[\x00-\x09\x0b-\x1f\x7f-\xff]")


def assert_clean_output(r: Run) -> None:
    """No byte of a target-chosen name reaches the terminal raw: printable
    ASCII and line ends only; errors are one line each, never a traceback."""
    for name, data in (("stdout", r.stdout), ("stderr", r.stderr)):
        bad = _RAW_CONTROL.search(data)
        assert bad is None, f"{name} of {r.argv[-2:]} holds a raw byte {bad.group()!r}: {data[:400]!r}"
    assert b"Traceback" not in r.stderr, r.stderr.decode()
    for line in r.stderr.decode().splitlines():
        assert line.startswith("ldfix: error: "), r.stderr.decode()


# --- a small root of the target's own ---------------------------------------------------------

def shared_libraries(prog: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(prog)], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def build_root(root: Path, fx: Fixtures) -> None:
    """The fixture program and exactly the libraries it needs, at their usual
    paths, plus /proc, /tmp and /lib."""
    for d in ("proc", "tmp", "lib", "evil"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(fx.target, root / fx.target.name)
    for lib in shared_libraries(fx.target):
        dest = root / str(lib).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib, dest)  # follows symlinks: a real file at the path the program asks for


def start_chrooted(root: Path, fx: Fixtures) -> Target:
    """ldfix-target chrooted in `root`, in a private mount namespace with its
    own procfs mounted at ROOT/proc, in the host's pid namespace (as a
    container run with the host's pids: /proc/N inside is a host process)."""
    q = shlex.quote
    script = (f"set -e; mount -t proc ldfix-proc {q(str(root / 'proc'))}; "
              f"exec chroot {q(str(root))} /{q(fx.target.name)}")
    t = Target(["unshare", "-m", "--propagation", "private", "sh", "-c", script])
    assert t.pid == t.proc.pid  # unshare, sh and chroot exec: this is the target
    assert os.readlink(f"/proc/{t.pid}/root") == str(root)
    return t


# --- detectors on the host's canary ------------------------------------------------------------

IN_ALL_EVENTS = 0xFFF
_IN_NAMES = {0x1: "ACCESS", 0x2: "MODIFY", 0x4: "ATTRIB", 0x8: "CLOSE_WRITE", 0x10: "CLOSE_NOWRITE",
             0x20: "OPEN", 0x40: "MOVED_FROM", 0x80: "MOVED_TO", 0x100: "CREATE", 0x200: "DELETE",
             0x400: "DELETE_SELF", 0x800: "MOVE_SELF", 0x40000000: "ISDIR"}


class Inotify:
    """inotify through ctypes: every event on the watched paths."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.paths: dict[int, str] = {}

    def watch(self, path: Path) -> None:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), IN_ALL_EVENTS | 0x02000000)  # IN_DONT_FOLLOW
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        self.paths[wd] = str(path)

    def events(self) -> list[str]:
        out = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            pos = 0
            while pos + 16 <= len(data):
                wd, mask, _cookie, n = struct.unpack_from("iIII", data, pos)
                name = data[pos + 16:pos + 16 + n].rstrip(b"\0").decode(errors="backslashreplace")
                kinds = "|".join(v for k, v in _IN_NAMES.items() if mask & k)
                out.append(f"{kinds} {self.paths.get(wd, wd)}{'/' + name if name else ''}")
                pos += 16 + n

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Canary:
    """Host files where the escaping names lead: DIR/real/* (other content than
    the target's copies), reached only through the symlink DIR/link -> real."""

    dir: Path
    notify: Inotify = field(default_factory=Inotify)

    @property
    def link(self) -> Path:
        return self.dir / "link"

    def make(self, files: dict[str, Path]) -> None:
        (self.dir / "real").mkdir(parents=True)
        for name, src in files.items():
            shutil.copy2(src, self.dir / "real" / name)
        self.link.symlink_to("real")
        for p in (self.dir, self.dir / "real", *(self.dir / "real" / n for n in files)):
            self.notify.watch(p)

    def host_id(self, name: str) -> tuple[int, int]:
        st = os.stat(self.dir / "real" / name)
        return st.st_dev, st.st_ino

    def arm(self) -> None:
        os.utime(self.link, (OLD_TIME, OLD_TIME), follow_symlinks=False)
        self.notify.events()  # the utime itself is an ATTRIB event: forget it

    def fired(self) -> list[str]:
        """Evidence that something looked at the canary since arm()."""
        evidence = []
        atime = os.lstat(self.link).st_atime
        if atime != OLD_TIME:
            evidence.append(f"{self.link} was followed (atime {time.ctime(atime)})")
        evidence += self.notify.events()
        return evidence


# --- the escaping names ---------------------------------------------------------------------

ODD = b"/odd\n\x1b[2J\x1b]0;pwned\x07\r\x7f\xff"   # a directory name with newline, escapes, DEL, non-UTF-8


@dataclass
class Case:
    id: str
    name: bytes            # what the target dlopen()s, recorded as l_name
    lib: str               # the library file it reaches inside the root (and the canary's on the host)
    in_root: bool = True   # the target's own resolution stays inside its root

    def naive(self, pid: int) -> bytes:
        """The name resolved the naive way, from the host."""
        if self.name.startswith(b"/"):
            return f"/proc/{pid}/root".encode() + self.name
        return f"/proc/{pid}/cwd/".encode() + self.name


def escape_cases(canary: Path) -> list[Case]:
    c = os.fsencode(canary)  # absolute, e.g. /tmp/ldfix-canary-1a2b3c
    up = b"../" * 16
    long = b"/" + b"./" * 1000 + b"lib/" + b"../" * 600 + c[1:] + b"/link/libcanary5.so"
    cases = [
        Case("dotdot", b"/lib/" + up + c[1:] + b"/link/libcanary1.so", "libcanary1.so"),
        Case("absolute-symlink", b"/evil/abs.so", "libcanary2.so"),
        Case("absolute-symlink-dir", b"/evil/hostdir/libcanary3.so", "libcanary3.so"),
        Case("relative-dotdot", up + c[1:] + b"/link/libcanary4.so", "libcanary4.so"),
        Case("near-PATH_MAX", long, "libcanary5.so"),
        Case("control-chars", ODD + b"/" + up + c[1:] + b"/link/libcanary6.so", "libcanary6.so"),
        Case("proc-self-root", b"/proc/self/root" + c + b"/link/libcanary7.so", "libcanary7.so"),
        # In the host's pid namespace /proc/N of a host process (/proc/1, the
        # host's init, in a container run with the host's pids; here this
        # test's own process: pid 1 of this machine is not ours to touch)
        # leads to the host's root: the target itself loads the host's file
        # (it is root, a chroot is no jail); ldfix must still not follow it.
        Case("proc-hostpid-root", b"/proc/%d/root" % os.getpid() + c + b"/link/libcanary8.so", "libcanary8.so",
             in_root=False),
    ]
    assert len(long) < 4000 and len(long) > 3800
    return cases


def open_in(t: Target, name: bytes) -> int:
    """dlopen in the target; the fixture's line holds 4095 bytes, so a long
    name (no newline in it) goes unencoded."""
    if len(name) * 2 + 7 < 4095:
        return t.open(os.fsdecode(name)).handle
    assert b"\n" not in name
    reply = t.cmd("open " + os.fsdecode(name))
    m = re.match(r"ok handle=(\S+)", reply)
    assert m, reply
    return int(m.group(1), 16)


@dataclass
class Scene:
    root: Path
    canary: Canary
    cases: list[Case]
    target: Target
    handles: dict[str, int]
    plain: bytes

    def in_root_id(self, lib: str) -> tuple[int, int]:
        st = os.stat(self.root / str(self.canary.dir).lstrip("/") / "real" / lib)
        return st.st_dev, st.st_ino


@pytest.fixture
def scene(fx: Fixtures) -> Iterator[Scene]:
    base = Path(tempfile.mkdtemp(prefix="ldfix-confine-", dir="/tmp"))
    canary = Canary(Path(tempfile.mkdtemp(prefix="ldfix-canary-", dir="/tmp")) / "c")
    root = base / "root"
    t: Target | None = None
    try:
        build_root(root, fx)
        cases = escape_cases(canary.dir)
        libs = sorted({c.lib for c in cases})
        canary.make({lib: fx.lib_v2 for lib in libs})   # the host's: other content
        inner = root / str(canary.dir).lstrip("/")      # the same path inside the root
        (inner / "real").mkdir(parents=True)
        for lib in libs:
            shutil.copy2(fx.lib, inner / "real" / lib)
        (inner / "link").symlink_to("real")
        (root / "evil/abs.so").symlink_to(canary.dir / "link/libcanary2.so")   # absolute, to a host path
        (root / "evil/hostdir").symlink_to(canary.dir / "link")
        (root / os.fsdecode(ODD[1:])).mkdir()
        shutil.copy2(fx.lib, root / "lib/libplain.so")
        # A debug file "for" the target's ld.so that is an absolute symlink to the host.
        ldso = next(p for p in shared_libraries(fx.target) if "ld-linux" in p.name)
        dbg = debug_file(root / "usr/lib/debug", elf_build_id(ldso))
        dbg.parent.mkdir(parents=True)
        dbg.symlink_to(canary.dir / "link/ld.debug")
        t = start_chrooted(root, fx)
        handles = {}
        for c in cases:
            handles[c.id] = open_in(t, c.name)
        plain = t.open("/lib/libplain.so").handle
        yield Scene(root, canary, cases, t, handles | {"plain": plain}, b"/lib/libplain.so")
    finally:
        if t is not None:
            t.kill()
        canary.notify.close()
        shutil.rmtree(canary.dir.parent, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def test_every_name_escapes_when_resolved_naively(scene: Scene) -> None:
    """The control: each name really leads to the host's canary when
    resolved through /proc/PID/root, and the detectors see it."""
    pid = scene.target.pid
    for c in scene.cases:
        scene.canary.arm()
        st = os.stat(c.naive(pid))
        assert (st.st_dev, st.st_ino) == scene.canary.host_id(c.lib), c.id
        assert scene.canary.fired(), f"{c.id}: the atime detector did not fire"
        scene.canary.arm()
        with open(c.naive(pid), "rb") as f:
            f.read(16)
        assert any("OPEN" in e for e in scene.canary.fired()), f"{c.id}: inotify did not fire"
    # And the target itself resolved each name inside its root (but proc-1-root).
    maps = Path(f"/proc/{pid}/maps").read_text()
    inner = str(scene.root) + str(scene.canary.dir) + "/real/"
    for c in scene.cases:
        where = (inner if c.in_root else str(scene.canary.dir) + "/real/") + c.lib
        assert where in maps, c.id


def test_dump_and_fix_never_touch_the_host(scene: Scene) -> None:
    pid = scene.target.pid
    libs_in_root = [c for c in scene.cases if c.in_root]
    for c in libs_in_root:
        replace_with_copy(scene.root / str(scene.canary.dir).lstrip("/") / "real" / c.lib)
    replace_with_copy(scene.root / "lib/libplain.so")
    host_ids = {scene.canary.host_id(c.lib) for c in scene.cases}

    runs = {}
    for args in (("dump", "--json"), ("dump",), ("fix", "--dry-run"), ("fix", "--json"), ("check",),
                 ("dump", "--json")):
        scene.canary.arm()
        r = run_cli(*args, str(pid))
        assert scene.canary.fired() == [], f"ldfix {' '.join(args)} touched the host's canary"
        assert_clean_output(r)
        runs.setdefault(args, []).append(r)

    # dump --json: the escaping names resolved inside the root, to the in-root files.
    first = runs[("dump", "--json")][0]
    assert first.returncode == 0, first.stderr
    assert first.stdout.count(b"\n") == 1  # one line of JSON
    doc = json.loads(first.stdout)
    by_name = {o["name"]: o for o in doc["objects"]}
    for c in scene.cases:
        o = by_name[escape(c.name)]
        cur = o["current"] and (o["current"]["dev"], o["current"]["ino"])
        assert cur not in host_ids, f"{c.id}: the host's file was looked at"
        if c.in_root and not c.name.startswith(b"/proc/"):
            assert o["status"] == "stale", (c.id, o)
            assert cur == scene.in_root_id(c.lib), c.id
        else:
            # /proc/self/root and /proc/1/root are magic links: refused, not followed.
            assert o["status"] == "missing" and cur is None, (c.id, o)
    assert by_name["/lib/libplain.so"]["status"] == "stale"

    # The names print escaped, as README documents: \n, \x1b, \xff; one row each.
    odd = next(c for c in scene.cases if c.id == "control-chars")
    shown = "/odd\\n\\x1b[2J\\x1b]0;pwned\\x07\\x0d\\x7f\\xff/"
    assert escape(odd.name).startswith(shown)
    assert escape(odd.name) in by_name
    table = runs[("dump",)][0]
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.decode().splitlines() if shown in line]
    assert len(rows) == 1 and " stale " in rows[0]
    assert len(table.stdout.decode().splitlines()) == len(doc["objects"]) + 4 + len(doc["warnings"])

    expected = {escape(c.name) for c in scene.cases if c.in_root and not c.name.startswith(b"/proc/")}
    dry = runs[("fix", "--dry-run")][0]
    assert dry.returncode == 0 and f"would rewrite {len(expected) + 1} id(s)".encode() in dry.stdout

    fixed = runs[("fix", "--json")][0]
    assert fixed.returncode == 0, fixed.stderr
    (proc,) = json.loads(fixed.stdout)["processes"]
    rewritten = {r["name"] for r in proc["rewritten"]}
    assert rewritten == expected | {"/lib/libplain.so"}
    for r in proc["rewritten"]:
        assert (r["new"]["dev"], r["new"]["ino"]) not in host_ids
    skipped = {s["name"]: s for s in proc["skipped"]}
    for c in scene.cases:
        if c.name.startswith(b"/proc/"):
            assert skipped[escape(c.name)]["status"] == "missing"

    assert runs[("check",)][0].returncode == 0
    after = json.loads(runs[("dump", "--json")][1].stdout)
    assert {o["status"] for o in after["objects"] if o["name"] in expected} == {"ok"}

    # The repair is real: the target reaches each in-root file by another
    # name and gets the object it already has (no second copy).
    inner = str(scene.canary.dir) + "/real/"
    for c in scene.cases:
        if c.in_root and not c.name.startswith(b"/proc/"):
            assert scene.target.open(inner + c.lib).handle == scene.handles[c.id], c.id
    assert scene.canary.fired() == []


NAIVE_LDFIX = """
import os, sys
from ldfix import native
def naive(rootfd, path):  # what RESOLVE_IN_ROOT prevents: /proc/PID/root + name
    return os.open(b"/proc/self/fd/%d/" % rootfd + path.lstrip(b"/"), os.O_PATH | os.O_CLOEXEC)
def naive_probe(rootfd, paths, stored):  # the batched lookup, made as naive
    out = []
    for p in paths:
        try:
            fd = naive(rootfd, p)
        except OSError as exc:
            out.append((exc.errno, 0, 0, 0, None))
            continue
        st = os.fstat(fd)
        os.close(fd)
        out.append((0, 0, st.st_dev, st.st_ino, None))  # no build-id: the slow path opens it
    return out
native.open_in_root = naive
native.probe_files = naive_probe
from ldfix.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_detectors_catch_a_naive_resolver(scene: Scene) -> None:
    """The harness has teeth: ldfix with its openat2(RESOLVE_IN_ROOT) swapped
    for a plain open below /proc/PID/root is caught by every detector."""
    for c in scene.cases:
        if c.in_root:
            replace_with_copy(scene.root / str(scene.canary.dir).lstrip("/") / "real" / c.lib)
    scene.canary.arm()
    p = subprocess.run([sys.executable, "-c", NAIVE_LDFIX, "dump", "--json", str(scene.target.pid)],
                       capture_output=True, timeout=RUN_TIMEOUT, check=False)
    evidence = scene.canary.fired()
    assert any("was followed" in e for e in evidence), evidence
    assert any("OPEN" in e for e in evidence), evidence
    doc = json.loads(p.stdout)
    host_ids = {scene.canary.host_id(c.lib) for c in scene.cases}
    seen = {(o["current"]["dev"], o["current"]["ino"]) for o in doc["objects"] if o["current"]}
    assert seen & host_ids


def test_hostile_debug_files_in_the_target_root(scene: Scene) -> None:
    """The debug-file search looks inside the target's root first: whatever
    sits there (a symlink to the host, a FIFO, garbage, a huge sparse file)
    must not reach the host, block, or break the run."""
    pid = scene.target.pid
    dbg = next((scene.root / "usr/lib/debug/.build-id").glob("*/*.debug"))
    variants = {
        "symlink-to-host": None,  # as the scene made it
        "fifo": lambda p: os.mkfifo(p),
        "garbage": lambda p: p.write_bytes(secrets.token_bytes(4096)),
        "elf-header-only": lambda p: p.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(57)),
        "sparse-16GiB": lambda p: (p.write_bytes(b""), os.truncate(p, 16 << 30)),
    }
    for what, make in variants.items():
        if make is not None:
            dbg.unlink()
            make(dbg)
        scene.canary.arm()
        r = run_cli("dump", "--json", str(pid))
        assert scene.canary.fired() == [], what
        assert_clean_output(r)
        assert r.returncode == 0, (what, r.stderr)
        assert r.seconds < 20, (what, r.seconds)
        doc = json.loads(r.stdout)
        assert doc["loader"]["layout_source"] is not None, (what, doc["loader"])


def _genuine_debug_file(scene: Scene) -> tuple[Path, Path]:
    """(the host's debug file of the target's ld.so, where the target's root would hold it)."""
    in_root = next((scene.root / "usr/lib/debug/.build-id").glob("*/*.debug"))
    host = Path("/usr/lib/debug/.build-id") / in_root.parent.name / in_root.name
    if not host.exists():
        pytest.skip(f"no host debug file {host} for the target's ld.so (apt-get install libc6-dbg)")
    return host, in_root


def corrupt_debug_file(scene: Scene) -> None:
    """In the target's root: the genuine debug file of its ld.so (right
    build-id, so ldfix parses it), its .debug_info and .debug_abbrev broken
    at their start (compressed: the deflate stream; else the bytes)."""
    from elftools.elf.elffile import ELFFile

    host, in_root = _genuine_debug_file(scene)
    data = bytearray(host.read_bytes())
    with open(host, "rb") as f:
        secs = {s.name: (s["sh_offset"], s["sh_flags"]) for s in ELFFile(f).iter_sections()}
    for name in (".debug_info", ".debug_abbrev"):
        off, flags = secs[name]
        start = off + 24 + 2 if flags & 0x800 else off  # SHF_COMPRESSED: Elf64_Chdr, zlib header
        data[start:start + 64] = b"\xff" * 64
    in_root.unlink()
    in_root.write_bytes(data)
    # The file really is hostile to the DWARF reader (not merely unreadable to it).
    with open(in_root, "rb") as f:
        try:
            for cu in ELFFile(f).get_dwarf_info(follow_links=False).iter_CUs():
                cu.get_top_DIE()
        except Exception as exc:  # noqa: BLE001 - whatever pyelftools raises
            from elftools.common.exceptions import ELFError
            if isinstance(exc, (ELFError, OSError, ValueError, KeyError, struct.error)):
                pytest.skip(f"this corruption gives {type(exc).__name__}, which ldfix handles")
            return
    pytest.skip("this corruption does not break pyelftools here")


def test_corrupt_debug_file_in_the_target_root_ends_cleanly(scene: Scene) -> None:
    """What holds today with a corrupt debug file planted in the target's
    root: one line, a documented code, bounded time, the host untouched."""
    corrupt_debug_file(scene)
    env = dict(os.environ, LDFIX_CACHE_DIR="")
    for args in (("dump",), ("fix",)):
        scene.canary.arm()
        r = run_cli(*args, str(scene.target.pid), env=env)
        assert scene.canary.fired() == []
        assert_clean_output(r)
        assert r.returncode == 0, r
        assert r.seconds < 20
    assert "t" not in _states(scene.target.pid)



def test_corrupt_debug_file_in_the_target_root_is_treated_as_absent(scene: Scene) -> None:
    corrupt_debug_file(scene)
    r = run_cli("dump", "--json", str(scene.target.pid), env=dict(os.environ, LDFIX_CACHE_DIR=""))
    assert r.returncode == 0, r.stderr
    # The corrupt file is skipped like an absent one: the search goes on to the
    # host's debug file for the same build-id, or to structure+table.
    assert json.loads(r.stdout)["loader"]["layout_source"] in ("dwarf", "structure+table")


def test_a_hostile_process_does_not_stop_the_repair_of_others(scene: Scene, target: Target,
                                                              libdir: Path) -> None:
    corrupt_debug_file(scene)
    lib = libdir / "libldfix_demo.so"
    target.open(lib)
    replace_with_copy(lib)
    r = run_cli("fix", str(scene.target.pid), str(target.pid), env=dict(os.environ, LDFIX_CACHE_DIR=""))
    assert_clean_output(r)
    import ldfix
    assert ldfix.inspect(target.pid).counts().get("stale", 0) == 0, "the good process was not repaired"
    # The corrupt debug file now only costs the hostile process its DWARF source.
    assert r.returncode == ExitCode.OK, r


def test_lenient_criu_hook_survives_a_hostile_debug_file(scene: Scene, tmp_path: Path) -> None:
    corrupt_debug_file(scene)
    env = dict(os.environ, LDFIX_CACHE_DIR="", CRTOOLS_SCRIPT_ACTION="post-restore",
               CRTOOLS_INIT_PID=str(scene.target.pid), LDFIX_CRIU_CONFIG=str(tmp_path / "none.conf"))
    r = run_cli("criu-hook", env=env)
    assert r.returncode == 0, r.stderr


def plant_decompression_bomb(scene: Scene, inflated: int) -> None:
    """In the target's root: its ld.so's debug file (right build-id) whose
    .debug_info is a zlib-compressed section of `inflated` zero bytes
    (~0.5% of that on disk)."""
    import zlib

    from elftools.elf.elffile import ELFFile

    host, in_root = _genuine_debug_file(scene)
    data = bytearray(host.read_bytes())
    with open(host, "rb") as f:
        e = ELFFile(f)
        shoff, shentsize = e["e_shoff"], e["e_shentsize"]
        idx = next(i for i, sec in enumerate(e.iter_sections()) if sec.name == ".debug_info")
    co = zlib.compressobj(1)
    chunk = bytes(1 << 20)
    blob = b"".join(co.compress(chunk) for _ in range(inflated >> 20)) + co.flush()
    chdr = struct.pack("<IIQQ", 1, 0, inflated, 1)       # Elf64_Chdr: ELFCOMPRESS_ZLIB, size, align
    hdr = shoff + idx * shentsize
    flags = struct.unpack_from("<Q", data, hdr + 8)[0]
    struct.pack_into("<Q", data, hdr + 8, flags | 0x800)  # SHF_COMPRESSED
    struct.pack_into("<QQ", data, hdr + 24, len(data), len(chdr) + len(blob))  # sh_offset, sh_size
    data += chdr + blob
    in_root.unlink()
    in_root.write_bytes(data)


def _limit_memory() -> None:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))


def test_debug_file_decompression_bomb_is_bounded(scene: Scene) -> None:
    plant_decompression_bomb(scene, 1 << 30)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "ldfix", "dump", "--json", str(scene.target.pid)],
                       capture_output=True, env=dict(os.environ, LDFIX_CACHE_DIR=""), timeout=RUN_TIMEOUT,
                       preexec_fn=_limit_memory, check=False)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["loader"]["layout_source"] is not None
    assert time.monotonic() - t0 < 10


def test_without_openat2_no_name_is_resolved(scene: Scene) -> None:
    """A kernel without openat2 (here: seccomp makes it ENOSYS): ldfix does not
    fall back to any other way of resolving a name; every file is `missing`."""
    from test_faults import SECCOMP_PRELUDE

    code = (SECCOMP_PRELUDE + "\nblock_process_vm(nrs=(437,))\nimport sys\nfrom ldfix.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    scene.canary.arm()
    p = subprocess.run([sys.executable, "-c", code, "dump", "--json", str(scene.target.pid)],
                       capture_output=True, timeout=RUN_TIMEOUT, check=False)
    assert scene.canary.fired() == []
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    files = [o for o in doc["objects"] if o["role"] == "library"]
    assert files and all(o["status"] == "missing" and o["current"] is None for o in files), files
    assert all("Function not implemented" in o["reason"] for o in files)


# --- privilege ----------------------------------------------------------------------------------

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@dataclass
class NobodyPython:
    python: str
    env: dict[str, str]
    tmp: Path


def _importable(python: str, env: dict[str, str]) -> bool:
    r = subprocess.run([*NOBODY, python, "-c", "import ldfix.cli, ldfix.native, elftools, psutil"],
                       capture_output=True, env=env, cwd="/", timeout=60, check=False)
    return r.returncode == 0


@pytest.fixture(scope="module")
def nobody_python() -> Iterator[NobodyPython]:
    """An interpreter that uid 65534 can run with ldfix importable: ours if it
    can, else the system python3 of the same version with a world-readable
    copy of the installed packages (ours may live under /root, mode 0700)."""
    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv (util-linux)")
    tmp = Path(tempfile.mkdtemp(prefix="ldfix-nobody-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    try:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        if _importable(sys.executable, env):
            yield NobodyPython(sys.executable, env, tmp)
            return
        import cffi
        import elftools
        import psutil

        import ldfix
        site = Path(ldfix.__file__).parent.parent
        for mod in (ldfix, elftools, psutil, cffi):
            shutil.copytree(Path(mod.__file__).parent, tmp / "site" / Path(mod.__file__).parent.name)
        for so in site.glob("_cffi_backend*.so"):
            shutil.copy2(so, tmp / "site" / so.name)
        subprocess.run(["chmod", "-R", "a+rX", str(tmp)], check=True)
        env["PYTHONPATH"] = str(tmp / "site")
        ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
        for cand in (shutil.which(ver, path="/usr/bin:/bin"), "/usr/bin/python3"):
            if cand and os.path.exists(cand) and _importable(cand, env):
                yield NobodyPython(cand, env, tmp)
                return
        pytest.skip(f"ldfix cannot be imported by uid 65534: {sys.executable} is not readable to it "
                    f"and no system {ver} can load a copy of the installed package")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _states(pid: int) -> list[str]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out.append(Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0])
        except OSError:
            pass
    return out


@pytest.mark.parametrize("command", ["dump", "fix", "check"])
def test_unprivileged_user_against_a_root_process(command: str, nobody_python: NobodyPython,
                                                  target: Target, libdir: Path) -> None:
    lib = libdir / "libldfix_demo.so"
    target.open(lib)
    replace_with_copy(lib)
    assert os.stat(f"/proc/{target.pid}").st_uid == 0
    args = [command, str(target.pid)]
    # strace (when present) records every read of another process's memory.
    strace = shutil.which("strace")
    log = nobody_python.tmp / f"strace-{command}.log"
    prefix = [strace, "-f", "-qq", "-o", str(log), "-e",
              "trace=process_vm_readv,process_vm_writev,ptrace,open,openat,openat2", *NOBODY] if strace else NOBODY
    r = run_cli(*args, prefix=prefix, python=nobody_python.python, env=nobody_python.env, cwd="/")
    assert r.returncode == ExitCode.ACCESS, r
    assert_clean_output(r)
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "permission denied" in err, err
    if command == "dump":
        assert r.stdout == b""  # no partial table
    if strace:
        calls = log.read_text()
        assert "process_vm_readv(" not in calls and "ptrace(" not in calls, calls
        # Of the target's /proc files only the world-readable ones opened: the
        # first privileged one (exe, auxv, mem, ...) was refused and ended the run.
        opened = re.findall(rf'"/proc/{target.pid}/([^"]+)".*= (\d+)$', calls, re.MULTILINE)
        assert opened and {f for f, _ in opened} <= {"status", "stat"}, calls
    # The target was not touched: running, answering, still stale.
    assert "t" not in _states(target.pid)
    assert target.cmd("threads 0") == "ok"
    import ldfix
    assert ldfix.inspect(target.pid).counts().get("stale") == 1


def test_unprivileged_user_against_its_own_process(nobody_python: NobodyPython, fx: Fixtures) -> None:
    """Same uid, ptrace allowed: ldfix still needs /proc/PID/map_files, which
    the kernel opens only to CAP_CHECKPOINT_RESTORE / CAP_SYS_ADMIN holders."""
    d = nobody_python.tmp / "own"
    d.mkdir()
    shutil.copy2(fx.target, d / "ldfix-target")
    shutil.copy2(fx.lib, d / "lib.so")
    subprocess.run(["chmod", "-R", "a+rX", str(d)], check=True)
    with Target([*NOBODY, str(d / "ldfix-target")], cwd="/") as t:
        t.open(d / "lib.so")
        assert os.stat(f"/proc/{t.pid}").st_uid == 65534
        r = run_cli("dump", str(t.pid), prefix=NOBODY, python=nobody_python.python, env=nobody_python.env,
                    cwd="/")
        assert r.returncode == ExitCode.ACCESS, r
        assert_clean_output(r)
        assert b"map_files" in r.stderr
        assert t.cmd("threads 0") == "ok"


def _bounded_caps(caps: str) -> list[str]:
    return ["setpriv", f"--bounding-set=-all,{caps}", "--inh-caps=-all"]


def test_root_with_only_the_capabilities_it_needs(target: Target, libdir: Path) -> None:
    """uid 0 with a reduced capability bounding set: which capabilities ldfix needs."""
    lib = libdir / "libldfix_demo.so"
    target.open(lib)
    replace_with_copy(lib)
    only_ptrace = run_cli("fix", str(target.pid), prefix=_bounded_caps("+sys_ptrace"))
    assert only_ptrace.returncode == ExitCode.ACCESS
    assert_clean_output(only_ptrace)
    assert b"map_files" in only_ptrace.stderr
    enough = run_cli("fix", str(target.pid), prefix=_bounded_caps("+sys_ptrace,+checkpoint_restore"))
    assert enough.returncode == 0, enough.stderr
    assert b"rewrote 1 id(s)" in enough.stdout
    none = run_cli("dump", str(target.pid), prefix=_bounded_caps("+checkpoint_restore"))
    assert none.returncode == ExitCode.ACCESS and none.stdout == b""
    assert_clean_output(none)


def test_permission_hint_names_the_missing_capability(target: Target) -> None:
    r = run_cli("dump", str(target.pid), prefix=_bounded_caps("+sys_ptrace"))
    assert r.returncode == ExitCode.ACCESS
    assert b"CAP_CHECKPOINT_RESTORE" in r.stderr, r.stderr


# --- ldfix inside a pid namespace ----------------------------------------------------------------

PIDNS_SCRIPT = r"""
exec 2>&1
lib="$1"; tgt="$2"; py="$3"; out="$4"
{ echo "open $lib"; sleep 60; } | "$tgt" > "$out" &
for i in $(seq 100); do [ -s "$out" ] && grep -q '^ok' "$out" && break; sleep 0.05; done
pid=$(head -1 "$out" | cut -d' ' -f2)
echo "target-pid $pid"
mv "$lib" "$lib.old"; cp "$lib.old" "$lib"
"$py" -m ldfix dump --json "$pid"; echo "rc dump $?"
"$py" -m ldfix fix --json "$pid"; echo "rc fix $?"
"$py" -m ldfix check "$pid"; echo "rc check $?"
"$py" -m ldfix dump "$PPID_OUTSIDE"; echo "rc outside $?"
kill %1
"""


def _pidns(prefix: list[str], fx: Fixtures, tmp: Path) -> tuple[dict[str, int], list[str], str]:
    d = Path(tempfile.mkdtemp(prefix="ldfix-pidns-", dir="/tmp"))
    try:
        shutil.copy2(fx.lib, d / "lib.so")
        shutil.copy2(fx.target, d / "ldfix-target")
        subprocess.run(["chmod", "-R", "a+rwX", str(d)], check=True)
        env = dict(os.environ, PPID_OUTSIDE=str(os.getpid()))
        p = subprocess.run([*prefix, "sh", "-c", PIDNS_SCRIPT, "sh", str(d / "lib.so"), str(d / "ldfix-target"),
                            sys.executable, str(d / "out")], capture_output=True, text=True, env=env,
                           timeout=120, check=False)
        codes = {m.group(1): int(m.group(2)) for m in re.finditer(r"^rc (\w+) (\d+)$", p.stdout, re.MULTILINE)}
        docs = [line for line in p.stdout.splitlines() if line.startswith("{")]
        return codes, docs, p.stdout
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_ldfix_inside_a_pid_namespace(fx: Fixtures, tmp_path: Path) -> None:
    """`unshare -p -f --mount-proc`: ldfix and its target in one new pid
    namespace (root in the initial user namespace): everything works; a pid
    of the outside is not visible (exit 3)."""
    codes, docs, out = _pidns(["unshare", "-p", "-f", "--mount-proc"], fx, tmp_path)
    assert re.search(r"^target-pid [2-9]\d*$", out, re.MULTILINE), out  # a pid of the new namespace
    assert codes == {"dump": 0, "fix": 0, "check": 0, "outside": ExitCode.NO_PROCESS}, out
    dump, fixed = json.loads(docs[0]), json.loads(docs[1])
    assert [o["status"] for o in dump["objects"] if o["name"].endswith("/lib.so")] == ["stale"]
    assert len(fixed["processes"][0]["rewritten"]) == 1
    assert "Traceback" not in out


def test_ldfix_inside_a_user_and_pid_namespace(fx: Fixtures, tmp_path: Path) -> None:
    """`unshare -U -r -p -f --mount-proc` (a rootless container): ptrace and
    /proc/PID/mem work inside, but /proc/PID/map_files needs a capability in
    the initial user namespace: a clean exit 4, nothing written."""
    probe = subprocess.run(["unshare", "-U", "-r", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces here: {probe.stderr.decode().strip()}")
    codes, _docs, out = _pidns(["unshare", "-U", "-r", "-p", "-f", "--mount-proc"], fx, tmp_path)
    assert codes == {"dump": ExitCode.ACCESS, "fix": ExitCode.ACCESS, "check": ExitCode.ACCESS,
                     "outside": ExitCode.NO_PROCESS}, out
    assert "map_files" in out and "Traceback" not in out


def test_host_ldfix_on_a_target_in_a_pid_namespace(fx: Fixtures, libdir: Path) -> None:
    """The usual container case: ldfix on the host, the target pid 1 of its
    own pid namespace; ldfix is given the host's pid."""
    lib = libdir / "libldfix_demo.so"
    with Target(["unshare", "-p", "-f", "--kill-child", str(fx.target)]) as t:
        assert t.pid == 1  # what the target sees
        (host_pid,) = (int(c) for tid in os.listdir(f"/proc/{t.proc.pid}/task")
                       for c in Path(f"/proc/{t.proc.pid}/task/{tid}/children").read_text().split())
        t.pid = host_pid
        first = t.open(lib)
        replace_with_copy(lib)
        r = run_cli("fix", str(host_pid))
        assert r.returncode == 0 and b"rewrote 1 id(s)" in r.stdout, r
        alias = libdir / "alias.so"
        alias.symlink_to(lib)
        assert t.open(alias).handle == first.handle
