"""Build glue: the cffi module (API mode, from csrc/) and the fixture programs
that `ldfix demo` runs, compiled with the same C compiler.  A missing compiler
fails the build loudly instead of shipping half a package."""

import os
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from distutils.command.build_scripts import build_scripts  # setuptools provides distutils

HERE = os.path.dirname(os.path.abspath(__file__))


def _cc() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise SystemExit("ldfix: a C compiler (cc) is needed to build ldfix")
    return cc


class BuildHook(build_scripts):
    """ldfix-criu-hook is a small C program, not a Python script: CRIU runs it
    at every stage, and the stages it ignores must not start an interpreter."""

    def run(self) -> None:
        os.makedirs(self.build_dir, exist_ok=True)
        subprocess.check_call([_cc(), "-O2", "-Wall", "-o", os.path.join(self.build_dir, "ldfix-criu-hook"),
                               os.path.join(HERE, "csrc", "criu_hook.c")])


class BuildWithFixtures(build_py):
    def run(self) -> None:
        super().run()
        out = os.path.join(self.build_lib, "ldfix", "_fixtures")
        os.makedirs(out, exist_ok=True)
        cc = _cc()
        src = os.path.join(HERE, "csrc", "fixtures")
        subprocess.check_call([cc, "-O2", "-Wall", "-rdynamic", "-o",
                               os.path.join(out, "ldfix-target"),
                               os.path.join(src, "target.c"), "-ldl", "-lpthread"])
        for variant in (1, 2):
            name = "libldfix_demo.so" if variant == 1 else "libldfix_demo_v2.so"
            subprocess.check_call([cc, "-O2", "-Wall", "-shared", "-fPIC",
                                   "-Wl,--build-id", "-Wl,-soname,libldfix_demo.so",
                                   f"-DLDFIX_DEMO_VARIANT={variant}", "-o",
                                   os.path.join(out, name), os.path.join(src, "libdemo.c")])
        self._build_agent(cc)

    def _build_agent(self, cc: str) -> None:
        """The preload agent (csrc/agent.c), once per C library: a musl program
        cannot preload a glibc-linked object, nor the reverse.  The musl build
        needs musl-gcc (Debian: musl-tools); without it only the glibc agent is
        installed, and the build says so."""
        out = os.path.join(self.build_lib, "ldfix", "_agent")
        os.makedirs(out, exist_ok=True)
        src = os.path.join(HERE, "csrc", "agent.c")
        flags = ["-O2", "-Wall", "-shared", "-fPIC", "-fvisibility=hidden", "-Wl,--build-id",
                 "-Wl,-z,now", "-Wl,-z,nodelete"]
        subprocess.check_call([cc, *flags, "-o", os.path.join(out, "libldfix_agent.so"), src, "-lpthread"])
        musl_out = os.path.join(out, "libldfix_agent_musl.so")
        musl_cc = os.environ.get("MUSL_CC") or shutil.which("musl-gcc")
        if musl_cc:
            subprocess.check_call([musl_cc, *flags, "-o", musl_out, src])
        else:
            if os.path.exists(musl_out):
                os.unlink(musl_out)
            print("ldfix: note: musl-gcc not found (Debian: apt-get install musl-tools): the preload agent "
                  "for musl programs (libldfix_agent_musl.so) is not built", file=sys.stderr)


setup(
    cffi_modules=["src/ldfix/_build_native.py:ffibuilder"],
    cmdclass={"build_py": BuildWithFixtures, "build_scripts": BuildHook},
    # Listed so that setuptools installs the scripts directory; BuildHook
    # compiles it into ldfix-criu-hook instead of copying it.
    scripts=["csrc/criu_hook.c"],
)
