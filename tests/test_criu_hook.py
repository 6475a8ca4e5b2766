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

from helpers import FifoTarget, Fixtures, Opened, Target, remount_fresh_tmpfs

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
    conf.write_text("stage = sometime\n")
    r = subprocess.run([str(HOOK)], env={**env, "CRTOOLS_SCRIPT_ACTION": "sometime"}, capture_output=True, text=True)
    assert r.returncode == 1 and "configuration error" in r.stderr


def _working_criu() -> str | None:
    criu = shutil.which("criu")
    if not criu:
        return None
    r = subprocess.run([criu, "check"], capture_output=True, text=True)
    return criu if r.returncode == 0 else None


@pytest.mark.skipif(_working_criu() is None, reason="no working criu on PATH (`criu check` fails or criu absent)")
def test_real_criu_dump_and_restore(fx: Fixtures, tmp_path: Path) -> None:
    criu = _working_criu()
    assert criu
    lib = tmp_path / "lib" / "libdemo.so"
    lib.parent.mkdir()
    shutil.copy2(fx.lib, lib)
    images = tmp_path / "img"
    images.mkdir()
    # A target detached from our pipes (CRIU cannot dump a process holding pipes to us).
    log = tmp_path / "target.log"
    ctl = tmp_path / "ctl"
    os.mkfifo(ctl)
    starter = f"setsid {fx.target} < {ctl} > {log} 2>&1 & exec 3>{ctl}; echo open {lib} >&3; sleep 1"
    subprocess.run(["sh", "-c", starter], check=True, timeout=30)
    pid = int(log.read_text().split()[1])
    subprocess.run([criu, "dump", "-t", str(pid), "-D", str(images), "--shell-job"], check=True, timeout=120)
    from helpers import replace_with_copy
    replace_with_copy(lib)
    report = tmp_path / "report.json"
    env = dict(os.environ, LDFIX_CRIU_REPORT=str(report))
    subprocess.run([criu, "restore", "-D", str(images), "--shell-job", "-d", "--action-script", str(HOOK)],
                   check=True, timeout=120, env=env)
    doc = json.loads(report.read_text())
    assert doc["failed"] == 0 and any(p["rewritten"] for p in doc["processes"])
    os.kill(pid, signal.SIGKILL)
