"""`ldfix demo`: the bug and the repair on real processes, in a few seconds.

Two identical processes load the same library.  A restore is simulated by
giving the file a new identity with the same content (a byte-identical copy
renamed over it: new inode).  Then a dlopen() through another path (a
symlink) loads a SECOND copy in the unrepaired twin, and returns the SAME
handle in the process that ldfix repaired.  Exits non-zero if the story does
not hold."""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from importlib import resources
from collections.abc import Callable
from pathlib import Path

from ldfix.errors import ExitCode

_OPEN = re.compile(r"ok handle=(\S+) state=(\S+) ctors=(\d+)")


class _Target:
    def __init__(self, exe: Path) -> None:
        self.p = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.buf = b""
        self.pid = int(self.line().split()[1])

    def line(self, timeout: float = 10.0) -> str:
        assert self.p.stdout is not None
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if not select.select([self.p.stdout], [], [], max(0.0, end - time.monotonic()))[0]:
                raise RuntimeError("the demo target did not answer")
            chunk = os.read(self.p.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError("the demo target exited")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def open(self, path: Path) -> tuple[int, int, int]:
        assert self.p.stdin is not None
        self.p.stdin.write(b"openx " + os.fsencode(path).hex().encode() + b"\n")
        reply = self.line()
        m = _OPEN.match(reply)
        if not m:
            raise RuntimeError(f"dlopen failed in the demo target: {reply}")
        return int(m.group(1), 16), int(m.group(2), 16), int(m.group(3))

    def close(self) -> None:
        self.p.kill()
        self.p.wait()


def _fixture(name: str) -> Path:
    path = Path(str(resources.files("ldfix") / "_fixtures" / name))
    if not path.exists():
        raise RuntimeError(f"the demo program {name} is missing from the installed package")
    return path


def run_demo(out: Callable[[str], None] | None = None) -> int:
    from ldfix.api import inspect
    from ldfix.repair import fix
    from ldfix.report import fix_text, inspection_table

    say: Callable[[str], None] = print if out is None else out
    exe, lib_src = _fixture("ldfix-target"), _fixture("libldfix_demo.so")
    with tempfile.TemporaryDirectory(prefix="ldfix-demo-") as tmp:
        libdir, altdir = Path(tmp, "lib"), Path(tmp, "alt")
        libdir.mkdir()
        altdir.mkdir()
        lib = libdir / "libldfix_demo.so"
        shutil.copy2(lib_src, lib)
        (altdir / "libdemo-alias.so").symlink_to(lib)
        alias = altdir / "libdemo-alias.so"
        repaired, twin = _Target(exe), _Target(exe)
        try:
            say(f"1. Two identical processes, {repaired.pid} and {twin.pid}, dlopen {lib}")
            h_rep, _, _ = repaired.open(lib)
            h_twin, _, _ = twin.open(lib)
            old = os.stat(lib)
            say(f"   handle {h_rep:#x} / {h_twin:#x}; the loader remembers dev:ino "
                f"{os.major(old.st_dev):x}:{os.minor(old.st_dev):02x}:{old.st_ino}")

            shutil.copy2(lib, libdir / "restored.tmp")
            os.rename(libdir / "restored.tmp", lib)
            new = os.stat(lib)
            say(f"\n2. Simulated restore: the same bytes, a new identity "
                f"(inode {old.st_ino} -> {new.st_ino}), as after a CRIU restore on another filesystem")

            say(f"\n3. ldfix dump {repaired.pid}:")
            ins = inspect(repaired.pid)
            say("   " + inspection_table(ins).replace("\n", "\n   "))
            stale = [o for o in ins.objects if o.status.value == "stale"]

            h2_twin, _, ctors_twin = twin.open(alias)
            second_copy = h2_twin != h_twin and ctors_twin == 2
            say(f"\n4. Unrepaired twin {twin.pid}: dlopen {alias} -> handle {h2_twin:#x}, "
                f"constructor runs: {ctors_twin}")
            say("   " + ("a SECOND copy was loaded (the bug)" if second_copy
                         else "no second copy?! (the bug did not show)"))

            say(f"\n5. ldfix fix {repaired.pid}:")
            rep = fix(repaired.pid)
            say("   " + fix_text(rep).replace("\n", "\n   "))

            h2_rep, _, ctors_rep = repaired.open(alias)
            same = h2_rep == h_rep and ctors_rep == 1
            say(f"\n6. Repaired process {repaired.pid}: dlopen {alias} -> handle {h2_rep:#x}, "
                f"constructor runs: {ctors_rep}")
            say("   " + ("the SAME handle: no second copy (repaired)" if same
                         else "a second copy was loaded: the repair did NOT work"))
        finally:
            repaired.close()
            twin.close()
    ok = bool(stale) and second_copy and same and len(rep.rewritten) == 1
    say("\nThe story holds." if ok else "\nThe story does NOT hold.")
    return ExitCode.OK if ok else ExitCode.INTERNAL
