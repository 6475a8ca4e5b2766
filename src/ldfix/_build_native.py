"""cffi build script (API mode): compiles csrc/ldfix_native.c into ldfix._native."""

import os
import re

from cffi import FFI

# setuptools wants paths relative to the project root (where setup.py runs).
_CSRC = "csrc"

def _declarations(header: str) -> str:
    """The header itself, less its include guard and #includes: the cdef cannot
    drift from what the C implements (cffi parses comments, enums and the
    integer #defines)."""
    with open(header) as f:
        lines = f.read().splitlines()
    skip = re.compile(r"\s*#\s*(if|ifndef|endif|include|define LDFIX_NATIVE_H)")
    return "\n".join(line for line in lines if not skip.match(line))

ffibuilder = FFI()
ffibuilder.cdef(_declarations(os.path.join(_CSRC, "ldfix_native.h")))
ffibuilder.set_source(
    "ldfix._native",
    '#include "ldfix_native.h"',
    sources=[os.path.join(_CSRC, "ldfix_native.c")],
    include_dirs=[_CSRC],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
