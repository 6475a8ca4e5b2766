"""The preload agent (issue 7), on real processes: glibc 2.36 (host), glibc
2.41 and musl 1.2.5 (the trixie root), musl 1.2.3 (host musl-gcc).

Every restore here is simulated the two ways of the core tests: the files
replaced by byte-identical copies (new inodes), or a fresh tmpfs mounted over
their directory in the target's private mount namespace (new device).  The
agent's own file is restored with them, as a real restore onto a new file
system does: that is what the agent detects.  No ldfix command runs before
the decisive dlopen(); ldfix.inspect only checks the ids afterwards."""

from __future__ import annotations

import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import Chroot, Fixtures, Target, remount_fresh_tmpfs, replace_with_copy

import ldfix
from ldfix.agent import agent_path
from ldfix.errors import LdfixError
from ldfix.model import Status

AGENT_NAMES = {"glibc": "libldfix_agent.so", "musl": "libldfix_agent_musl.so"}


def installed_agent(kind: str) -> Path:
    try:
        return Path(agent_path(kind))
    except LdfixError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def glibc_agent() -> Path:
    return installed_agent("glibc")


@pytest.fixture(scope="module")
def musl_agent() -> Path:
    return installed_agent("musl")


def env_with(preload: str | Path | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LD_PRELOAD", "LDFIX_AGENT"))}
    if preload is not None:
        env["LD_PRELOAD"] = str(preload)
        env.setdefault("LDFIX_AGENT_DEBUG", "1")  # diagnostics land in pytest's captured stderr
    env.update(extra)
    return env


def no_stale(pid: int, tries: int = 50) -> ldfix.Inspection:
    """ldfix.inspect until it sees consistent lists; assert no id is stale."""
    for _ in range(tries):
        ins = ldfix.inspect(pid)
        if not ins.partial and ins.loader.layout_source is not None:
            break
        time.sleep(0.02)
    stale = [o.display_name for o in ins.objects if o.status is Status.STALE]
    assert not stale, f"stale ids left: {stale}"
    return ins


def check_story(t: Target, twin: Target, lib: str, alias: str, restore: Callable[[], None]) -> None:
    """t has the agent, twin has not; both load lib, a restore happens, both
    dlopen() it through a new path: twin loads a second copy, t gets its own."""
    first, twin_first = t.open(lib), twin.open(lib)
    assert first.ctors == 1 and twin_first.ctors == 1
    restore()
    second = twin.open(alias)  # the bug, observed without the agent
    assert second.handle != twin_first.handle and second.state != twin_first.state and second.ctors == 2
    again = t.open(alias)      # no ldfix run: the agent repaired on its own
    assert again.handle == first.handle, "a second copy was loaded despite the agent"
    assert again.state == first.state and again.ctors == 1
    no_stale(t.pid)


# --------------------------------------------------------------------- host


def test_agent_installed_and_active(glibc_agent: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "ldfix", "agent-path"], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0 and out.stdout.strip() == str(glibc_agent)
    assert glibc_agent.read_bytes()[:4] == b"\x7fELF"
    code = "import ldfix.agent as a; print(a.status()); print(a.loaded_agent())"
    res = subprocess.run([sys.executable, "-c", code], env=env_with(glibc_agent, LDFIX_AGENT_DEBUG="0"),
                         capture_output=True, text=True, check=True)
    status, loaded = res.stdout.splitlines()
    version = platform.libc_ver()[1]
    offset = {"2.36": 968, "2.37": 968, "2.38": 968}.get(version, 992)  # reference T1, x86_64
    assert status.startswith(f"active: glibc {version}, id at +{offset}"), status
    assert "load lock verified" in status and "name pre-check on" in status
    assert loaded == str(glibc_agent) and res.stderr == ""


def agent_copy(kind: str, directory: Path) -> Path:
    dest = directory / AGENT_NAMES[kind]
    shutil.copy2(installed_agent(kind), dest)
    return dest


def host_new_inode(fx: Fixtures, kind: str, tmp_path: Path, **env: str) -> None:
    d = tmp_path / "lib"
    d.mkdir()
    lib = d / "libldfix_demo.so"
    shutil.copy2(fx.lib, lib)
    agent = agent_copy(kind, d)
    alias = tmp_path / "alias.so"
    alias.symlink_to(lib)

    def restore() -> None:
        replace_with_copy(lib)
        replace_with_copy(agent)
    with Target([str(fx.target)], env=env_with(agent, **env)) as t, \
            Target([str(fx.target)], env=env_with(None)) as twin:
        check_story(t, twin, str(lib), str(alias), restore)


def host_fresh_tmpfs(fx: Fixtures, kind: str, tmp_path: Path) -> None:
    d = tmp_path / "mnt"
    d.mkdir()
    agent_src = installed_agent(kind)
    q = shlex.quote
    setup = f"mount -t tmpfs ldfix-before {q(str(d))} && cp {q(str(fx.lib))} {q(str(agent_src))} {q(str(d))}/"
    preload = f"LD_PRELOAD={q(str(d / agent_src.name))} LDFIX_AGENT_DEBUG=1"
    with_agent = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                  f"{setup} && exec env {preload} {q(str(fx.target))}"]
    without = ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{setup} && exec {q(str(fx.target))}"]
    lib = d / fx.lib.name
    with Target(with_agent, env=env_with(None)) as t, Target(without, env=env_with(None)) as twin:
        def restore() -> None:
            for pid in (t.pid, twin.pid):
                remount_fresh_tmpfs(pid, d, [fx.lib, agent_src])
                subprocess.run(["nsenter", "-t", str(pid), "-m", "ln", "-s", str(lib), str(d / "alias.so")],
                               check=True)
        check_story(t, twin, str(lib), str(d / "alias.so"), restore)


def test_glibc_host_new_inode(fx: Fixtures, tmp_path: Path) -> None:
    host_new_inode(fx, "glibc", tmp_path)


def test_glibc_host_new_inode_write_lock_only(fx: Fixtures, tmp_path: Path) -> None:
    """The serialisation used when glibc's load lock cannot be verified."""
    host_new_inode(fx, "glibc", tmp_path, LDFIX_AGENT_LOCK="write")


def test_glibc_host_fresh_tmpfs(fx: Fixtures, tmp_path: Path) -> None:
    host_fresh_tmpfs(fx, "glibc", tmp_path)


def test_musl_host_new_inode(fx_musl: Fixtures, tmp_path: Path) -> None:
    host_new_inode(fx_musl, "musl", tmp_path)


def test_musl_host_fresh_tmpfs(fx_musl: Fixtures, tmp_path: Path) -> None:
    host_fresh_tmpfs(fx_musl, "musl", tmp_path)


def test_other_namespaces_are_repaired(fx: Fixtures, tmp_path: Path) -> None:
    """dlmopen() namespaces too (glibc dl_iterate_phdr shows only the caller's)."""
    d = tmp_path / "lib"
    d.mkdir()
    lib = d / "libldfix_demo.so"
    shutil.copy2(fx.lib, lib)
    agent = agent_copy("glibc", d)
    with Target([str(fx.target)], env=env_with(agent)) as t:
        first = t.open(lib)
        other = t.open(lib, mopen=True)
        assert other.lmid != 0
        replace_with_copy(lib)
        replace_with_copy(agent)
        (tmp_path / "alias.so").symlink_to(lib)
        assert t.open(tmp_path / "alias.so").handle == first.handle
        ins = no_stale(t.pid)
        assert {o.namespace for o in ins.objects if o.display_name == str(lib)} == {0, other.lmid}


def test_changed_library_is_not_rewritten(fx: Fixtures, tmp_path: Path) -> None:
    d = tmp_path / "lib"
    d.mkdir()
    lib = d / "libldfix_demo.so"
    shutil.copy2(fx.lib, lib)
    agent = agent_copy("glibc", d)
    with Target([str(fx.target)], env=env_with(agent)) as t:
        first = t.open(lib)
        shutil.copy2(fx.lib_v2, d / "new.so")
        os.rename(d / "new.so", lib)  # another build at the same path
        replace_with_copy(agent)
        (tmp_path / "alias.so").symlink_to(lib)
        other = t.open(tmp_path / "alias.so")
        assert other.handle != first.handle and other.ctors == 2  # as without a restore
        ins = ldfix.inspect(t.pid)
        status = {(o.display_name, o.address): o.status for o in ins.objects}
        assert status[(str(lib), first.handle)] is Status.CHANGED
        assert not [o for o in ins.objects if o.status is Status.STALE]


# ------------------------------------------------------------ trixie root


def start_in_root(box: Chroot, preload: str | None, tmpfs_libdir: str | None = None,
                  tmpfs_files: list[Path] = (), **env: str) -> Target:  # type: ignore[assignment]
    """Like Chroot.start, with the agent preloaded (a path inside the root)."""
    q = shlex.quote
    steps = ["set -e"]
    if tmpfs_libdir is not None:
        d = box.host_dir / tmpfs_libdir
        d.mkdir(exist_ok=True)
        steps.append(f"mount -t tmpfs -o size=16m ldfix-before {q(str(d))}")
        steps.extend(f"cp {q(str(f))} {q(str(d))}/" for f in tmpfs_files)
    inner = [box.inner + "/" + box.fx.target.name]
    if preload:
        inner = ["/usr/bin/env", f"LD_PRELOAD={preload}", "LDFIX_AGENT_DEBUG=1",
                 *[f"{k}={v}" for k, v in env.items()], *inner]
    steps.append(f"exec chroot {q(str(box.root))} {' '.join(q(a) for a in inner)}")
    t = Target(["unshare", "-m", "--propagation", "private", "sh", "-c", "; ".join(steps)], env=env_with(None))
    box.targets.append(t)
    assert os.readlink(f"/proc/{t.pid}/root") == str(box.root)
    return t


def root_status(box: Chroot, agent_inner: str) -> str:
    """The agent's own account of itself, in a short-lived target in the root."""
    res = subprocess.run(["chroot", str(box.root), "/usr/bin/env", f"LD_PRELOAD={agent_inner}",
                          "LDFIX_AGENT_DEBUG=1", f"{box.inner}/{box.fx.target.name}"],
                         input="exit\n", capture_output=True, text=True, timeout=30, env=env_with(None),
                         check=True)
    return res.stderr


def root_new_inode(box: Chroot, kind: str) -> None:
    agent_inner = f"{box.inner}/lib/{AGENT_NAMES[kind]}"
    shutil.copy2(installed_agent(kind), box.host(agent_inner))
    status = root_status(box, agent_inner)
    assert "ldfix-agent: active:" in status, status
    lib, alias = box.lib(), f"{box.inner}/alias.so"
    os.symlink(lib, box.host(alias))
    t, twin = start_in_root(box, agent_inner), start_in_root(box, None)

    def restore() -> None:
        replace_with_copy(box.host(lib))
        replace_with_copy(box.host(agent_inner))
    check_story(t, twin, lib, alias, restore)


def root_fresh_tmpfs(box: Chroot, kind: str) -> None:
    agent_src = installed_agent(kind)
    agent_inner = f"{box.inner}/mnt/{agent_src.name}"
    files = [box.fx.lib, agent_src]
    t = start_in_root(box, agent_inner, tmpfs_libdir="mnt", tmpfs_files=files)
    twin = start_in_root(box, None, tmpfs_libdir="mnt", tmpfs_files=files)
    host_dir = box.host_dir / "mnt"

    def restore() -> None:
        for pid in (t.pid, twin.pid):
            remount_fresh_tmpfs(pid, host_dir, files)
            # relative: inside the chroot the host-side path does not exist
            subprocess.run(["nsenter", "-t", str(pid), "-m", "ln", "-s", box.fx.lib.name,
                            str(host_dir / "alias.so")], check=True)
    check_story(t, twin, box.lib("mnt"), f"{box.inner}/mnt/alias.so", restore)


def test_glibc_241_new_inode(box: Chroot) -> None:
    status = root_status_for(box, "glibc")
    assert "active: glibc 2.41, id at +992" in status and "load lock verified" in status, status
    root_new_inode(box, "glibc")


def root_status_for(box: Chroot, kind: str) -> str:
    (box.host_dir / "probe").mkdir(exist_ok=True)
    inner = f"{box.inner}/probe/{AGENT_NAMES[kind]}"
    shutil.copy2(installed_agent(kind), box.host(inner))
    return root_status(box, inner)


def test_glibc_241_fresh_tmpfs(box: Chroot) -> None:
    root_fresh_tmpfs(box, "glibc")


def test_musl_125_new_inode(musl_box: Chroot) -> None:
    status = root_status_for(musl_box, "musl")
    assert "active: musl, id at +152" in status, status
    root_new_inode(musl_box, "musl")


def test_musl_125_fresh_tmpfs(musl_box: Chroot) -> None:
    root_fresh_tmpfs(musl_box, "musl")


# ---------------------------------------------------------------- threads


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    """Every thread of pid stopped (SIGSTOP) for the duration."""
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            states = []
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            if all(s == "T" for s in states):
                break
            time.sleep(0.001)
        else:
            raise AssertionError("the target did not stop")
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("kind,lock", [("glibc", "load"), ("glibc", "write"), ("musl", "load")])
def test_threads_across_restores(kind: str, lock: str, fx: Fixtures, fx_musl: Fixtures, tmp_path: Path) -> None:
    """Threads dlopen()/dlclose() all the time (through the agent) while the
    files are restored again and again (the process frozen meanwhile, as by a
    checkpoint); after each restore a new path must find the original object.
    No crash, no deadlock, no stale id left."""
    f = fx if kind == "glibc" else fx_musl
    d = tmp_path / "lib"
    d.mkdir()
    lib = d / "libldfix_demo.so"
    shutil.copy2(f.lib, lib)
    churn = [d / f"libchurn{i}.so" for i in range(3)]
    for c in churn:
        shutil.copy2(f.lib_v2, c)
    agent = agent_copy(kind, d)
    env = env_with(agent, LDFIX_AGENT_DEBUG="0", **({"LDFIX_AGENT_LOCK": "write"} if lock == "write" else {}))
    with Target([str(f.target)], env=env, timeout=60) as t:
        first = t.open(lib)
        for c in churn + churn:  # two threads per library
            assert t.cmd(f"churn {c}") == "ok"
        assert t.cmd("threads 4") == "ok"
        aliases = tmp_path / "aliases"
        aliases.mkdir()
        for i in range(40):
            with frozen(t.pid):  # as a checkpoint/restore does; the files change meanwhile
                for p in (lib, agent, *churn):
                    replace_with_copy(p)
            alias = aliases / f"a{i}.so"
            alias.symlink_to(lib)
            got = t.open(alias)
            # (ctors counts the churning libraries' constructors too)
            assert got.handle == first.handle and got.state == first.state, f"restore {i}: second copy"
            if kind == "glibc" and i % 10 == 0 and i < 50:  # (16 namespaces at most)
                other = t.open(churn[i % 3], mopen=True)  # dlmopen through the agent as well
                assert other.lmid > 0
        assert t.alive()
        assert t.cmd("threads 1") == "ok"  # still answering: no deadlock
        no_stale(t.pid)


# ------------------------------------------------------- never restored


def normalise(lines: list[str]) -> list[str]:
    """Addresses and pids replaced by their order of appearance."""
    seen: dict[str, str] = {}

    def sub(m: re.Match[str]) -> str:
        return seen.setdefault(m.group(0), f"<{len(seen)}>")
    return [re.sub(r"0x[0-9a-f]+|\(nil\)|(?<=ready )\d+", sub, line) for line in lines]


def scripted(fx: Fixtures, exe: Path, preload: Path | None, script: list[str]) -> tuple[list[str], str, set[str]]:
    """Run a fixture target through a script; its answers, stderr and the
    files it had mapped just before exiting (without the agent)."""
    p = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env_with(preload, LDFIX_AGENT_DEBUG="0") if preload else env_with(None))
    assert p.stdin and p.stdout
    out = [p.stdout.readline().strip()]
    pid = int(out[0].split()[1])
    for line in script:
        p.stdin.write(line + "\n")
        p.stdin.flush()
        out.append(p.stdout.readline().strip())
    with open(f"/proc/{pid}/maps") as m:
        mapped = {ln.split(None, 5)[5].strip() for ln in m if len(ln.split(None, 5)) == 6}
    mapped = {x for x in mapped if not x.endswith(tuple(AGENT_NAMES.values()))}
    _, err = p.communicate("exit\n", timeout=30)
    assert p.returncode == 0
    return out, err, mapped


@pytest.mark.parametrize("kind", ["glibc", "musl"])
def test_never_restored_is_unchanged(kind: str, fx: Fixtures, fx_musl: Fixtures, tmp_path: Path) -> None:
    """Same answers (handles, errors, namespaces, constructor counts), same
    loaded files, nothing on stderr: with and without the agent.  $ORIGIN is
    resolved against the caller (the program), which only works because the
    agent enters the real dlopen() with the caller's return address."""
    f = fx if kind == "glibc" else fx_musl
    agent = installed_agent(kind)
    (tmp_path / "lib").mkdir()
    exe = tmp_path / "prog"
    shutil.copy2(f.target, exe)
    lib = tmp_path / "lib" / "libldfix_demo.so"
    shutil.copy2(f.lib, lib)
    (tmp_path / "alias.so").symlink_to(lib)
    script = [f"open {lib}", f"open {tmp_path / 'alias.so'}", f"open {lib}", "open /nonexistent/libx.so",
              "open libldfix_demo.so", f"open {tmp_path}/lib", "open libc.so.6"]
    if kind == "glibc":
        script += ["open $ORIGIN/lib/libldfix_demo.so", f"mopen {lib}", f"mopen {tmp_path / 'alias.so'}"]
    script += [f"open {lib}"]
    base, base_err, base_maps = scripted(f, exe, None, script)
    got, got_err, got_maps = scripted(f, exe, agent, script)
    assert normalise(got) == normalise(base)
    assert got_err == base_err == ""
    assert got_maps == base_maps
    assert any(line.startswith("err ") for line in base) and any("ctors=1" in line for line in base)
    if kind == "glibc":
        assert base[8].startswith("ok handle="), base[8]  # $ORIGIN found the library


# ------------------------------------------------ explicit repair, inert agent


PY_TARGET = r"""
import ctypes, sys
import ldfix.agent
first = ctypes.CDLL(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
r = ldfix.agent.repair_in_process()
again = ctypes.CDLL(sys.argv[2])
print(r.method, r.rewritten, again._handle == first._handle, flush=True)
"""


@pytest.mark.parametrize("with_agent", [True, False])
def test_repair_in_process(with_agent: bool, fx: Fixtures, tmp_path: Path) -> None:
    """ldfix.agent.repair_in_process(): the agent's ldfix_repair() when it is
    preloaded (called before any dlopen() after the restore), else ldfix.fix
    on the process itself."""
    d = tmp_path / "lib"
    d.mkdir()
    lib = d / "libldfix_demo.so"
    shutil.copy2(fx.lib, lib)
    agent = agent_copy("glibc", d)
    (tmp_path / "alias.so").symlink_to(lib)
    p = subprocess.Popen([sys.executable, "-c", PY_TARGET, str(lib), str(tmp_path / "alias.so")],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env=env_with(agent if with_agent else None))
    assert p.stdin and p.stdout
    try:
        assert p.stdout.readline().strip() == "ready"
        replace_with_copy(lib)
        replace_with_copy(agent)
        out, _ = p.communicate("go\n", timeout=60)
    finally:
        p.kill()
    method, rewritten, same = out.split()
    if with_agent:
        assert method == "agent" and int(rewritten) == 2  # the library and the agent itself
    else:
        assert method == "ldfix" and int(rewritten) == 1
    assert same == "True"


def test_disabled_agent_is_inert(fx: Fixtures, tmp_path: Path) -> None:
    agent = installed_agent("glibc")
    code = "import ldfix.agent as a; print(a.status()); print(a.repair_in_process().method)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env_with(agent, LDFIX_AGENT_DISABLE="1", LDFIX_AGENT_DEBUG="1"))
    assert res.stdout.splitlines() == ["inert: LDFIX_AGENT_DISABLE is set", "ldfix"]
    assert res.stderr.count("ldfix-agent: inert") == 1
    quiet = subprocess.run([sys.executable, "-c", "import ldfix.agent as a; print(a.status())"],
                           capture_output=True, text=True, check=True,
                           env=env_with(agent, LDFIX_AGENT_DISABLE="1", LDFIX_AGENT_DEBUG="0"))
    assert quiet.stderr == "" and quiet.stdout.startswith("inert:")
