"""ldfix fix on real glibc processes of the host: the repair works, and is safe."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import ldfix
from helpers import REPO, Fixtures, Target, ldfix as run_ldfix, remount_fresh_tmpfs, replace_with_copy
from ldfix.errors import ExitCode, LoaderBusy
from ldfix.model import Status


def alias_of(lib: Path, tmp: Path, name: str = "alias") -> Path:
    d = tmp / name
    d.mkdir(exist_ok=True)
    link = d / "libalias.so"
    if not link.exists():
        link.symlink_to(lib)
    return link


def test_fix_after_new_inode(fx: Fixtures, libdir: Path, tmp_path: Path) -> None:
    lib = libdir / "libldfix_demo.so"
    with Target([str(fx.target)]) as t, Target([str(fx.target)]) as twin:
        first, twin_first = t.open(lib), twin.open(lib)
        replace_with_copy(lib)
        alias = alias_of(lib, tmp_path)
        # Without ldfix the loader loads a second copy: observed, so the test cannot pass vacuously.
        second = twin.open(alias)
        assert second.handle != twin_first.handle and second.state != twin_first.state
        assert second.ctors == 2
        res = run_ldfix("fix", "--json", str(t.pid))
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        (proc,) = doc["processes"]
        assert [r["name"] for r in proc["rewritten"]] == [str(lib)]
        assert proc["error"] is None and proc["pause_us"] > 0 and proc["freeze"] == "ptrace"
        st = os.stat(lib)
        assert proc["rewritten"][0]["new"] == {"dev": st.st_dev, "ino": st.st_ino}
        again = t.open(alias)
        assert again.handle == first.handle, "a second copy was loaded after the repair"
        assert again.state == first.state  # global state is shared
        assert again.ctors == 1            # the constructor did not run again
        assert run_ldfix("check", str(t.pid)).returncode == 0
        assert run_ldfix("check", str(twin.pid)).returncode == ExitCode.STALE


def test_fix_after_fresh_tmpfs(fx: Fixtures, tmp_path: Path) -> None:
    libdir = tmp_path / "mnt"
    libdir.mkdir()
    script = f"mount -t tmpfs ldfix-before {libdir} && cp {fx.lib} {libdir}/ && exec {fx.target}"
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
    with Target(argv) as t, Target(argv) as twin:
        lib = libdir / fx.lib.name
        first, twin_first = t.open(lib), twin.open(lib)
        remount_fresh_tmpfs(t.pid, libdir, [fx.lib])
        remount_fresh_tmpfs(twin.pid, libdir, [fx.lib])
        # The alias lives inside the fresh tmpfs: visible only in the targets' namespaces.
        for pid in (t.pid, twin.pid):
            subprocess.run(["nsenter", "-t", str(pid), "-m", "ln", "-s", str(lib),
                            str(libdir / "alias.so")], check=True)
        second = twin.open(libdir / "alias.so")
        assert second.handle != twin_first.handle and second.ctors == 2
        rep = ldfix.fix(t.pid)
        assert [r.name for r in rep.rewritten] == [os.fsencode(lib)]
        assert rep.rewritten[0].new.dev != rep.rewritten[0].old.dev
        again = t.open(libdir / "alias.so")
        assert again.handle == first.handle and again.state == first.state and again.ctors == 1


def test_python_target_with_ctypes(fx: Fixtures, libdir: Path, tmp_path: Path) -> None:
    lib = libdir / "libldfix_demo.so"
    argv = [sys.executable, str(REPO / "tests" / "pytarget.py")]
    with Target(argv) as t, Target(argv) as twin:
        first, twin_first = t.open(lib), twin.open(lib)
        replace_with_copy(lib)
        alias = alias_of(lib, tmp_path)
        assert twin.open(alias).handle != twin_first.handle
        assert run_ldfix("fix", str(t.pid)).returncode == 0
        again = t.open(alias)
        assert again.handle == first.handle and again.state == first.state


def test_self_repair_from_python(fx: Fixtures, libdir: Path, tmp_path: Path) -> None:
    lib = libdir / "libldfix_demo.so"
    with Target([sys.executable, str(REPO / "tests" / "pytarget.py")]) as t:
        first = t.open(lib)
        replace_with_copy(lib)
        reply = t.cmd("selffix")
        assert reply.startswith("ok rewritten=1"), reply
        assert "self" in reply
        again = t.open(alias_of(lib, tmp_path))
        assert again.handle == first.handle


def _writable_memory(pid: int) -> dict[tuple[int, int], bytes]:
    out = {}
    with open(f"/proc/{pid}/maps") as f, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in f:
            rng, perms = line.split()[:2]
            if "w" not in perms or "[vvar" in line:
                continue
            lo, hi = (int(x, 16) for x in rng.split("-"))
            mem.seek(lo)
            out[(lo, hi)] = mem.read(hi - lo)
    return out


def test_dry_run_writes_nothing(target: Target, libdir: Path) -> None:
    lib = libdir / "libldfix_demo.so"
    target.open(lib)
    replace_with_copy(lib)
    os.kill(target.pid, signal.SIGSTOP)  # nothing of its own changes its memory meanwhile
    try:
        before = _writable_memory(target.pid)
        res = run_ldfix("fix", "--dry-run", str(target.pid))
        after = _writable_memory(target.pid)
    finally:
        os.kill(target.pid, signal.SIGCONT)
    assert res.returncode == 0, res.stderr
    assert "would rewrite 1 id(s)" in res.stdout and str(lib) in res.stdout
    assert before == after
    assert ldfix.inspect(target.pid).counts().get("stale") == 1


def test_changed_library_is_not_rewritten(fx: Fixtures, libdir: Path, tmp_path: Path) -> None:
    lib = libdir / "libldfix_demo.so"
    with Target([str(fx.target)]) as t:
        first = t.open(lib)
        tmp = libdir / "new.so"
        shutil.copy2(fx.lib_v2, tmp)
        os.rename(tmp, lib)
        doc = json.loads(run_ldfix("fix", "--json", str(t.pid)).stdout)
        (proc,) = doc["processes"]
        assert proc["rewritten"] == []
        (skip,) = [s for s in proc["skipped"] if s["name"] == str(lib)]
        assert skip["status"] == "changed"
        # The loader treats the new build as a new object, exactly as without a restore.
        other = t.open(alias_of(lib, tmp_path))
        assert other.handle != first.handle and other.ctors == 2


def test_busy_loader_and_repeated_fixes(fx: Fixtures, libdir: Path, tmp_path: Path) -> None:
    """Threads dlopen/dlclose other libraries while ldfix runs again and again."""
    lib = libdir / "libldfix_demo.so"
    churn = [tmp_path / f"churn{i}.so" for i in range(3)]
    for c in churn:
        shutil.copy2(fx.lib_v2, c)
    with Target([str(fx.target)]) as t:
        first = t.open(lib)
        for c in churn:
            assert t.cmd(f"churn {c}") == "ok"
        assert t.cmd("threads 4") == "ok"
        repaired = busy = 0
        for _ in range(200):
            replace_with_copy(lib)
            try:
                rep = ldfix.fix(t.pid, max_attempts=5)
            except LoaderBusy:
                busy += 1
                continue
            assert len(rep.rewritten) == 1
            repaired += 1
        assert t.alive()
        assert repaired > 0
        final = ldfix.fix(t.pid, max_attempts=200)
        assert ldfix.inspect(t.pid).counts().get("stale", 0) == 0
        again = t.open(alias_of(lib, tmp_path))
        assert again.handle == first.handle
        del final, busy


def test_killed_during_freeze_leaves_target_running(target: Target, libdir: Path) -> None:
    lib = libdir / "libldfix_demo.so"
    target.open(lib)
    assert target.cmd("threads 3") == "ok"
    replace_with_copy(lib)
    env = dict(os.environ, LDFIX_TEST_HOLD_MS="5000")
    p = subprocess.Popen([sys.executable, "-m", "ldfix", "fix", str(target.pid)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # wait until every thread is held
        states = [open(f"/proc/{target.pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()[0]
                  for t in os.listdir(f"/proc/{target.pid}/task")]
        if len(states) == 4 and all(s == "t" for s in states):
            break
        time.sleep(0.01)
    else:
        p.kill()
        pytest.fail("ldfix never held the target")
    p.kill()
    p.wait()
    time.sleep(0.05)
    states = [open(f"/proc/{target.pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()[0]
              for t in os.listdir(f"/proc/{target.pid}/task")]
    assert "t" not in states
    assert target.open(lib).handle  # it answers: it runs on


def test_tree_repairs_every_live_process_once(fx: Fixtures, libdir: Path, tmp_path: Path) -> None:
    lib = libdir / "libldfix_demo.so"
    with Target([str(fx.target)]) as parent:
        parent.open(lib)
        children = []
        for i in range(3):
            fin, fout = tmp_path / f"in{i}", tmp_path / f"out{i}"
            os.mkfifo(fin)
            os.mkfifo(fout)
            reply = parent.cmd(f"serve {fin} {fout}")
            assert reply.startswith("ok pid="), reply
            w = open(fin, "w", buffering=1)
            r = open(fout)
            assert r.readline().startswith("ready")
            children.append((int(reply.split("=")[1]), w, r))
        for pid, w, r in children:
            w.write(f"openx {os.fsencode(lib).hex()}\n")
            assert r.readline().startswith("ok handle=")
        w0, r0 = children[0][1], children[0][2]
        w0.write("threads 5\n")
        assert r0.readline().strip() == "ok"
        zombie = int(parent.cmd("spin").split("=")[1])
        os.kill(zombie, signal.SIGKILL)  # never reaped by its parent: a zombie
        exiting_pid, we, _re = children[2]
        replace_with_copy(lib)
        killer = threading.Timer(0.02, lambda: os.kill(exiting_pid, signal.SIGKILL))
        killer.start()
        res = run_ldfix("fix", "--tree", "--json", str(parent.pid))
        killer.join()
        doc = json.loads(res.stdout)
        by_pid = {p["pid"]: p for p in doc["processes"]}
        assert len(by_pid) == len(doc["processes"])  # each address space once
        for pid in (parent.pid, children[0][0], children[1][0]):
            assert by_pid[pid]["error"] is None, by_pid[pid]
            assert len(by_pid[pid]["rewritten"]) == 1
        assert by_pid[zombie]["error"] and "zombie" in by_pid[zombie]["error"]
        ex = by_pid.get(exiting_pid)
        if ex is not None and ex["error"]:
            assert "exited" in ex["error"] or "no such process" in ex["error"]
        assert res.returncode == ExitCode.PARTIAL
        for pid, w, r in children[:2]:
            w.write(f"openx {os.fsencode(alias_of(lib, tmp_path)).hex()}\n")
            assert "ctors=1" in r.readline()


def test_exit_codes(target: Target) -> None:
    assert run_ldfix("fix", "999999999").returncode == ExitCode.NO_PROCESS
    r = run_ldfix("fix", str(target.pid), "999999999")
    assert r.returncode == ExitCode.PARTIAL
    assert r.stderr.count("ldfix: error:") == 1 and "Traceback" not in r.stderr
    assert run_ldfix("fix", "notapid").returncode == ExitCode.USAGE
    assert run_ldfix("bogus").returncode == ExitCode.USAGE
    assert run_ldfix("fix", "2").returncode == ExitCode.UNSUPPORTED  # kthreadd: a kernel thread


def test_static_binary_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "s.c"
    src.write_text("#include <unistd.h>\nint main(void) { pause(); return 0; }\n")
    exe = tmp_path / "static-sleeper"
    r = subprocess.run(["gcc", "-static", "-o", str(exe), str(src)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot link a static program: {r.stderr.strip()[:200]}")
    with subprocess.Popen([str(exe)]) as p:
        try:
            time.sleep(0.05)
            for cmd in ("dump", "fix", "check"):
                res = run_ldfix(cmd, str(p.pid))
                assert res.returncode == ExitCode.UNSUPPORTED, (cmd, res.stderr)
                assert res.stderr.count("\n") == 1 and "static binary" in res.stderr
        finally:
            p.kill()


def test_an_id_changed_between_plan_and_write_is_not_overwritten(fx: Fixtures, tmp_path: Path) -> None:
    """Another writer changes an id after planning: under the freeze the swap
    sees it and writes nothing at all (fix() then plans again)."""
    from ldfix.api import open_session
    from ldfix.repair import Prepared, _plan
    libs = [tmp_path / f"lib{i}.so" for i in range(3)]
    for p in libs:
        shutil.copy2(fx.lib, p)
    with Target([str(fx.target)]) as t:
        for p in libs:
            t.open(p)
        for p in libs:
            replace_with_copy(p)
        with open_session(t.pid) as s:
            plan, _ = _plan(s)
            assert len(plan) == 3
            prep = Prepared.of(s, plan)
            with open(f"/proc/{t.pid}/mem", "r+b", buffering=0) as mem:
                mem.seek(plan[1].address)
                mem.write(b"\x11" * 16)  # someone else's write, after planning
                outcome, i = prep.swap()
                assert (outcome, i) == ("changed", 1)
                for k, rw in enumerate(plan):
                    mem.seek(rw.address)
                    assert mem.read(16) == (b"\x11" * 16 if k == 1 else rw.old.pack()), "something was written"
        # The next run plans again from what is there now and repairs all three.
        rep = ldfix.fix(t.pid)
        assert len(rep.rewritten) == 3
