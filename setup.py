"""Build glue: the cffi module (API mode, from csrc/) and the fixture programs
that `ldfix demo` runs, compiled with the same C compiler.  A missing compiler
fails the build loudly instead of shipping half a package."""

import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildWithFixtures(build_py):
    def run(self) -> None:
        super().run()
        out = os.path.join(self.build_lib, "ldfix", "_fixtures")
        os.makedirs(out, exist_ok=True)
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not cc:
            raise SystemExit("ldfix: a C compiler (cc) is needed to build the fixture programs")
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


setup(
    cffi_modules=["src/ldfix/_build_native.py:ffibuilder"],
    cmdclass={"build_py": BuildWithFixtures},
)
