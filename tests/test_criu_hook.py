"""The CRIU restore hook, run exactly as CRIU runs it, on an emulated restore.

The restored tree: a glibc parent, a forked glibc child with threads, and a
musl child, in a private mount namespace whose library directory is a tmpfs.
The "restore" mounts a fresh tmpfs with byte-identical copies over it (new
device and inodes), and the tasks are held as CRIU holds them: at
post-restore they sleep and cannot run (here: SIGSTOP), at pre-resume every
thread is ptrace-stopped by CRIU (here: a tracer process).  The hook binary is
executed with no arguments, once per stage in CRIU's order, with
CRTOOLS_SCRIPT_ACTION, CRTOOLS_INIT_PID and CRTOOLS_IMAGE_DIR set as CRIU sets
them.  Then the tasks resume and dlopen the library through a new symlink."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import Chroot, FifoTarget, Fixtures, Opened, Target, remount_fresh_tmpfs, replace_with_copy

HOOK = Path(sysconfig.get_path("scripts")) / "ldfix-criu-hook"
RESTORE_STAGES = ["pre-restore", "setup-namespaces", "post-setup-namespaces", "post-restore",
                  "network-unlock", "pre-resume", "post-resume"]


@dataclass
class Tree:
    parent: Target
    children: list[FifoTarget]
    libdir: Path
    libs: dict[int, str]          # pid -> library it loaded
    first: dict[int, Opened]

    @property
    def members(self) -> list[Target]:
        return [self.parent, *self.children]


@contextmanager
def restored_tree(fx: Fixtures, fx_musl: Fixtures, tmp_path: Path, extra_static: Path | None = None) -> Iterator[Tree]:
    libdir = tmp_path / "libs"
    libdir.mkdir()
    script = (f"mount -t tmpfs ldfix-before {libdir} && cp {fx.lib} {libdir}/libg.so && "
              f"cp {fx_musl.lib} {libdir}/libm.so && exec {fx.target}")
    parent = Target(["unshare", "-m", "--propagation", "private", "sh", "-c", script])
    children: list[FifoTarget] = []
    try:
        threaded = FifoTarget(parent, "serve", tmp_path / "fifo")
        children.append(threaded)
        assert threaded.cmd("threads 4") == "ok"
        musl = FifoTarget(parent, "spawn", tmp_path / "fifo", prog=fx_musl.target)
        children.append(musl)
        if extra_static is not None:
            children.append(FifoTarget(parent, "spawn", tmp_path / "fifo", prog=extra_static))
        libs = {parent.pid: f"{libdir}/libg.so", threaded.pid: f"{libdir}/libg.so",
                musl.pid: f"{libdir}/libm.so"}
        first = {t.pid: t.open(libs[t.pid]) for t in (parent, threaded, musl)}
        # The restore: the same files, new device and inode numbers.
        remount_fresh_tmpfs(parent.pid, libdir, [])
        subprocess.run(["nsenter", "-t", str(parent.pid), "-m", "sh", "-c",
                        f"cp {fx.lib} {libdir}/libg.so && cp {fx_musl.lib} {libdir}/libm.so && "
                        f"ln -s libg.so {libdir}/alias-g.so && ln -s libm.so {libdir}/alias-m.so"], check=True)
        yield Tree(parent, children, libdir, libs, first)
    finally:
        for c in children:
            c.kill()
        parent.kill()


def all_pids(tree: Tree) -> list[int]:
    return [t.pid for t in tree.members]


class Holder:
    """Holds a tree as CRIU does at the given stage."""

    def __init__(self, tree: Tree, how: str) -> None:
        self.pids, self.how, self.tracer = all_pids(tree), how, None

    def __enter__(self) -> Holder:
        if self.how == "sigstop":
            for p in self.pids:
                os.kill(p, signal.SIGSTOP)
        else:
            code = ("import sys, ldfix.freeze as f, ldfix.procfs as p\n"
                    f"hs = [f.freeze(p.Process(pid)) for pid in {self.pids!r}]\n"
                    "print('held', flush=True)\nsys.stdin.read()\n[h.thaw() for h in hs]\n")
            self.tracer = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True)
            assert self.tracer.stdout.readline().strip() == "held"
        # Wait until every thread is stopped.
        deadline = time.monotonic() + 10
        while not all(self._stopped(p) for p in self.pids):
            assert time.monotonic() < deadline, "tasks did not stop"
            time.sleep(0.005)
        return self

    @staticmethod
    def _stopped(pid: int) -> bool:
        states = []
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        return all(s in ("T", "t") for s in states)

    def release(self) -> None:
        if self.how == "sigstop":
            for p in self.pids:
                os.kill(p, signal.SIGCONT)
        elif self.tracer is not None:
            self.tracer.stdin.close()
            self.tracer.wait(10)
            self.tracer = None

    def __exit__(self, *exc: object) -> None:
        self.release()


def run_stages(init_pid: int, env_extra: dict[str, str], holder: Holder, tmp_path: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every restore stage in CRIU's order; tasks released before post-resume."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    fd = os.open(images, os.O_RDONLY | os.O_DIRECTORY)
    out = {}
    try:
        for stage in RESTORE_STAGES:
            if stage == "post-resume":
                holder.release()
            env = {k: v for k, v in os.environ.items() if not k.startswith(("LDFIX_", "CRTOOLS_"))}
            env.update(env_extra)
            env["CRTOOLS_SCRIPT_ACTION"] = stage
            env["CRTOOLS_IMAGE_DIR"] = f"/proc/{os.getpid()}/fd/{fd}"
            if stage != "pre-restore":
                env["CRTOOLS_INIT_PID"] = str(init_pid)
            out[stage] = subprocess.run([str(HOOK)], env=env, capture_output=True, text=True,
                                        timeout=60, stdin=subprocess.DEVNULL, pass_fds=(fd,))
    finally:
        os.close(fd)
    return out


def resume_and_check(tree: Tree, same: bool) -> None:
    for t in tree.members[:3]:
        alias = f"{tree.libdir}/alias-{'g' if tree.libs[t.pid].endswith('libg.so') else 'm'}.so"
        got = t.open(alias)
        if same:
            assert got.handle == tree.first[t.pid].handle, f"pid {t.pid}: a second copy"
            assert got.ctors == 1
        else:
            assert got.handle != tree.first[t.pid].handle and got.ctors == 2


def test_hook_is_installed_next_to_ldfix() -> None:
    assert HOOK.exists() and os.access(HOOK, os.X_OK)
    with open(HOOK, "rb") as f:
        assert f.read(4) == b"\x7fELF"  # a binary: no interpreter at the stages it ignores


@pytest.mark.parametrize("stage,how", [("post-restore", "sigstop"), ("pre-resume", "ptrace")])
def test_hook_repairs_every_restored_process(stage: str, how: str, fx: Fixtures, fx_musl: Fixtures,
                                            tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    with restored_tree(fx, fx_musl, tmp_path) as tree:
        with Holder(tree, how) as holder:
            runs = run_stages(tree.parent.pid, {"LDFIX_CRIU_STAGE": stage, "LDFIX_CRIU_REPORT": str(report)},
                              holder, tmp_path)
        for s, r in runs.items():
            assert r.returncode == 0, (s, r.stderr)
            if s != stage:
                assert r.stderr == "" and r.stdout == ""  # ignored stages do nothing at all
        assert "rewrote" in runs[stage].stderr
        doc = json.loads(report.read_text())
        assert doc["stage"] == stage and doc["failed"] == 0
        by_pid = {p["pid"]: p for p in doc["processes"]}
        assert set(by_pid) == set(all_pids(tree))
        kinds = sorted(p["loader"]["kind"] for p in doc["processes"])
        assert kinds == ["glibc", "glibc", "musl"]
        for p in doc["processes"]:
            assert len(p["rewritten"]) == 1, p
            expect = "held by criu" if stage == "post-restore" else "already stopped by tracer"
            assert p["freeze"].startswith(expect), p["freeze"]
        resume_and_check(tree, same=True)


def test_without_the_hook_a_second_copy_is_loaded(fx: Fixtures, fx_musl: Fixtures, tmp_path: Path) -> None:
    with restored_tree(fx, fx_musl, tmp_path) as tree:
        resume_and_check(tree, same=False)


@pytest.fixture(scope="module")
def static_target(fx: Fixtures, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers import FIXTURE_SRC
    out = tmp_path_factory.mktemp("static") / "ldfix-target-static"
    r = subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(FIXTURE_SRC / "target.c"),
                        "-ldl", "-lpthread"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot link a static program: {r.stderr.strip()[:200]}")
    return out


@pytest.mark.parametrize("mode", ["strict", "lenient"])
def test_modes_with_an_unsupported_process(mode: str, fx: Fixtures, fx_musl: Fixtures, tmp_path: Path,
                                           static_target: Path) -> None:
    report = tmp_path / "report.json"
    with restored_tree(fx, fx_musl, tmp_path, extra_static=static_target) as tree:
        with Holder(tree, "sigstop") as holder:
            runs = run_stages(tree.parent.pid, {"LDFIX_CRIU_MODE": mode, "LDFIX_CRIU_REPORT": str(report)},
                              holder, tmp_path)
        acting = runs["post-restore"]
        assert "static binary" in acting.stderr
        assert acting.returncode == (1 if mode == "strict" else 0)
        doc = json.loads(report.read_text())
        assert doc["failed"] == 1 and doc["mode"] == mode
        if mode == "lenient":
            resume_and_check(tree, same=True)  # the others were repaired all the same


def test_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "hook.conf"
    conf.write_text("# ldfix\nstage = pre-resume\nmode = strict\n")
    env = {"LDFIX_CRIU_CONFIG": str(conf), "CRTOOLS_SCRIPT_ACTION": "post-restore", "PATH": os.environ["PATH"]}
    # post-restore is not the configured stage: ignored, even without an init pid.
    assert subprocess.run([str(HOOK)], env=env, capture_output=True).returncode == 0
    env["CRTOOLS_SCRIPT_ACTION"] = "pre-resume"
    r = subprocess.run([str(HOOK)], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "CRTOOLS_INIT_PID is not set" in r.stderr  # strict: no init pid fails
    conf.write_text("stage = post-restor\n")  # misspelt: never silently ignored
    for action in ("pre-restore", "pre-resume"):
        r = subprocess.run([str(HOOK)], env={**env, "CRTOOLS_SCRIPT_ACTION": action}, capture_output=True)
        assert r.returncode == 0 and r.stderr == b""
    r = subprocess.run([str(HOOK)], env={**env, "CRTOOLS_SCRIPT_ACTION": "post-restore"}, capture_output=True,
                       text=True)
    assert r.returncode == 1 and "configuration error" in r.stderr


# A real CRIU dump and restore.  CRIU (>= 4.1 on kernels that map
# [vvar_vclock]) must be on PATH and `criu check` must pass, as root; CI
# machines have none, so the test is skipped there.

def _find_criu() -> tuple[str | None, str]:
    """(path of a criu that can dump and restore here, or None; why not)."""
    criu = shutil.which("criu")
    if not criu:
        return None, "no criu on PATH"
    try:
        ver = subprocess.run([criu, "--version"], capture_output=True, text=True, timeout=30, check=False)
        chk = subprocess.run([criu, "check"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{criu} does not run: {exc}"
    if chk.returncode != 0:
        return None, f"`{criu} check` fails (exit {chk.returncode}): {(chk.stderr or chk.stdout).strip()[-200:]}"
    m = re.search(r"Version:\s*(\d+)\.(\d+)", ver.stdout)
    version = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    with open("/proc/self/maps") as f:
        vclock = "[vvar_vclock]" in f.read()
    if vclock and version < (4, 1):
        # CRIU learnt the [vvar_vclock] mapping in 4.1; older ones fail every
        # restore here ("Unexpected rt vDSO area bounds").
        return None, f"{criu} is version {version[0]}.{version[1]}: this kernel needs CRIU >= 4.1"
    return criu, ""


CRIU, NO_CRIU_REASON = _find_criu()


@pytest.mark.skipif(CRIU is None, reason=f"no working criu: {NO_CRIU_REASON}")
@pytest.mark.parametrize("stage", ["post-restore", "pre-resume"])
def test_real_criu_dump_and_restore(stage: str, fx: Fixtures, tmp_path: Path) -> None:
    """A real glibc process that dlopen()ed a library is dumped; the library
    file then gets a new inode (same bytes, same path); the process is
    restored twice from the same images.  Without the hook, a dlopen of the
    library through a new symlink loads a second copy (the loader's stale id
    no longer matches); with the hook it returns the handle the process had."""
    assert CRIU is not None
    lib = tmp_path / "lib" / "libdemo.so"
    lib.parent.mkdir()
    shutil.copy2(fx.lib, lib)
    alias = lib.with_name("alias.so")
    images = tmp_path / "img"
    images.mkdir()
    with _subreaper(), _CriuPeer(fx.target, tmp_path) as peer:
        pid = peer.pid
        first = peer.open(lib)
        assert first.ctors == 1
        assert peer.cmd("threads 2") == "ok"  # every thread must be held, not only the leader
        old = os.stat(lib)
        _criu(["dump", "-t", str(pid), "-D", str(images)], tmp_path / "dump.log")
        assert peer.proc.wait(10) == -signal.SIGKILL  # CRIU kills the dumped tree; the pid is free again
        # The restore finds the same bytes under the same path, in a new inode.
        replace_with_copy(lib)
        new = os.stat(lib)
        assert (new.st_dev, new.st_ino) != (old.st_dev, old.st_ino)
        alias.symlink_to(lib.name)

        # Without the hook: the loader's id is stale, a second copy is loaded.
        _criu(["restore", "-D", str(images), "-d"], tmp_path / "restore-plain.log")
        peer.restored(pid)
        got = peer.open(alias)
        assert got.handle != first.handle and got.ctors == 2, "no second copy without the hook: the test proves nothing"
        peer.kill_restored()

        # With the hook, from the same images.
        report = tmp_path / "report.json"
        log = tmp_path / "restore-hook.log"
        _criu(["restore", "-D", str(images), "-d", "--action-script", str(HOOK)], log,
              {"LDFIX_CRIU_STAGE": stage, "LDFIX_CRIU_REPORT": str(report),
               "LDFIX_CRIU_CONFIG": str(tmp_path / "no-such.conf")})
        peer.restored(pid)
        said = [ln for ln in log.read_text().splitlines() if ln.startswith("ldfix-criu-hook:")]
        assert said and all(ln.startswith(f"ldfix-criu-hook: {stage}: ") for ln in said), said
        assert f"ldfix-criu-hook: {stage}: pid {pid}: glibc" in said[0] and "rewrote 1 id(s)" in said[0], said
        doc = json.loads(report.read_text())
        assert doc["stage"] == stage and doc["init_pid"] == pid, doc
        assert doc["failed"] == 0 and doc["exit_code"] == 0, doc
        assert [p["pid"] for p in doc["processes"]] == [pid]
        proc = doc["processes"][0]
        assert proc["loader"]["kind"] == "glibc" and proc["error"] is None, proc
        assert len(proc["rewritten"]) == 1, proc
        assert proc["rewritten"] == [{"name": str(lib), "namespace": 0, "address": proc["rewritten"][0]["address"],
                                      "old": {"dev": old.st_dev, "ino": old.st_ino},
                                      "new": {"dev": new.st_dev, "ino": new.st_ino}}], proc["rewritten"]
        expect = "held by criu" if stage == "post-restore" else "already stopped by tracer"
        assert proc["freeze"].startswith(expect), proc["freeze"]
        got = peer.open(alias)
        assert got.handle == first.handle, "a second copy after the hook"
        assert got.ctors == 1 and got.state == first.state
        peer.kill_restored()


@contextmanager
def _subreaper() -> Iterator[None]:
    """`criu restore -d` leaves the restored task to the nearest subreaper
    (else to pid 1, which may never reap it and so keep its pid busy): be it,
    for the test's duration, so that the test can reap what it restored."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    if libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) != 0:
        pytest.skip(f"PR_SET_CHILD_SUBREAPER: {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        libc.prctl(pr_set_child_subreaper, 0, 0, 0, 0)


def _criu(args: list[str], log: Path, env_extra: dict[str, str] | None = None) -> None:
    """criu ARGS, with no config file (none may add an action script), a log."""
    assert CRIU is not None
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LDFIX_", "CRTOOLS_")) and k != "CRIU_CONFIG_FILE"}
    env.update(env_extra or {})
    r = subprocess.run([CRIU, *args, "--no-default-config", "-v4", "-o", str(log)], env=env, check=False,
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:] if log.exists() else []
        pytest.fail(f"criu {args[0]} failed ({r.returncode}): {r.stderr}\n" + "\n".join(tail))


class _CriuPeer(Target):
    """An ldfix-target CRIU can dump: its own session, stdin and stdout on
    FIFOs opened by path, stderr on /dev/null, nothing shared with pytest.
    The test holds both FIFOs open read-write the whole time, so the target
    never sees EOF or EPIPE while it is dumped and restored, and the restored
    task, which CRIU reopens the FIFOs for by path, is spoken to the same way."""

    def __init__(self, prog: Path, workdir: Path, timeout: float = 20.0) -> None:
        fin, fout = workdir / "ctl.in", workdir / "ctl.out"
        os.mkfifo(fin)
        os.mkfifo(fout)
        self.timeout, self._buf = timeout, b""
        self.restored_pid: int | None = None
        self._w = os.open(fin, os.O_RDWR)
        self._r = os.open(fout, os.O_RDWR)
        child_in, child_out = os.open(fin, os.O_RDONLY), os.open(fout, os.O_WRONLY)
        try:
            self.proc = subprocess.Popen([str(prog)], stdin=child_in, stdout=child_out,
                                         stderr=subprocess.DEVNULL, cwd=workdir, start_new_session=True)
        finally:
            os.close(child_in)
            os.close(child_out)
        line = self.readline()
        if not line.startswith("ready "):
            self.kill()
            raise RuntimeError(f"target did not start: {line!r}")
        self.pid = int(line.split()[1])
        assert self.pid == self.proc.pid

    def __enter__(self) -> _CriuPeer:
        return self

    def readline(self) -> str:
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("target did not answer")
            self._buf += os.read(self._r, 4096)
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def cmd(self, line: str) -> str:
        assert not self._buf, f"unread output: {self._buf!r}"  # a FIFO's content is dumped too
        os.write(self._w, line.encode() + b"\n")
        return self.readline()

    def restored(self, pid: int) -> None:
        """CRIU restored the target (same pid); it is now our child."""
        self.restored_pid = pid  # reaped by kill() whatever happens next
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        assert fields[0] not in ("Z", "X") and int(fields[1]) == os.getpid(), fields[:2]

    def kill_restored(self) -> None:
        if self.restored_pid is not None:
            pid, self.restored_pid = self.restored_pid, None
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # frees the pid for the next restore

    def kill(self) -> None:
        try:
            self.kill_restored()
        except OSError:
            pass
        super().kill()
        for fd in (self._w, self._r):
            try:
                os.close(fd)
            except OSError:
                pass


def test_hook_on_a_container_with_another_glibc(box: Chroot, tmp_path: Path) -> None:
    """A 'container': its own mount namespace and root (Debian 13, glibc 2.41) on a
    host with glibc 2.36; the restore gives its library directory a fresh tmpfs."""
    t = box.start(tmpfs_libdir="mnt")
    lib = box.lib("mnt")
    first = t.open(lib)
    host_dir = box.host_dir / "mnt"
    remount_fresh_tmpfs(t.pid, host_dir, [box.fx.lib])
    subprocess.run(["nsenter", "-t", str(t.pid), "-m", "ln", "-s", box.fx.lib.name,
                    str(host_dir / "alias.so")], check=True)
    report = tmp_path / "report.json"
    os.kill(t.pid, signal.SIGSTOP)  # as CRIU holds it at post-restore
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LDFIX_", "CRTOOLS_"))}
        env.update(CRTOOLS_SCRIPT_ACTION="post-restore", CRTOOLS_INIT_PID=str(t.pid),
                   LDFIX_CRIU_REPORT=str(report), LDFIX_CRIU_CONFIG=str(tmp_path / "none.conf"))
        r = subprocess.run([str(HOOK)], env=env, capture_output=True, text=True, timeout=60)
    finally:
        os.kill(t.pid, signal.SIGCONT)
    assert r.returncode == 0, r.stderr
    (proc,) = json.loads(report.read_text())["processes"]
    assert proc["loader"]["version"] == "2.41" and [w["name"] for w in proc["rewritten"]] == [lib]
    again = t.open(f"{box.inner}/mnt/alias.so")
    assert again.handle == first.handle and again.ctors == 1
