"""cffi build script (API mode): compiles csrc/ldfix_native.c into ldfix._native."""

import os

from cffi import FFI

# setuptools wants paths relative to the project root (where setup.py runs).
_CSRC = "csrc"

ffibuilder = FFI()
ffibuilder.cdef(
    """
    int ldfix_vm_read(int pid, int memfd, size_t n, const uint64_t *addrs,
                      const uint64_t *lens, unsigned char *buf, int64_t *done);
    int ldfix_vm_write(int pid, int memfd, size_t n, const uint64_t *addrs,
                       const uint64_t *lens, const unsigned char *buf, int64_t *done);
    int ldfix_open_in_root(int rootfd, const char *path);
    int ldfix_open_regular(int pathfd);
    int ldfix_ptrace_seize(int tid, unsigned long options);
    int ldfix_ptrace_interrupt(int tid);
    int ldfix_ptrace_detach(int tid, int sig);
    int ldfix_waitpid(int tid, int *status, int options);
    int ldfix_kcmp_vm(int pid1, int pid2);
    int ldfix_swap16(int pid, int memfd, size_t n, const uint64_t *addrs,
                     const unsigned char *old, const unsigned char *new_,
                     unsigned char *scratch, int64_t *done);
    int ldfix_relink(int pid, int memfd, size_t nheads, const uint64_t *heads,
                     size_t nknown, const uint64_t *known, uint32_t next_off,
                     uint32_t prev_off, size_t limit, unsigned char *reached,
                     uint64_t *left_at, uint64_t *left_prev);
    int ldfix_walk(int pid, int memfd, uint64_t head, uint32_t next_off,
                   uint32_t prev_off, uint32_t read_size, uint32_t min_size,
                   uint64_t user_top, size_t max, unsigned char *buf,
                   uint64_t *addrs, uint32_t *lens, int *stop);
    """
)
ffibuilder.set_source(
    "ldfix._native",
    '#include "ldfix_native.h"',
    sources=[os.path.join(_CSRC, "ldfix_native.c")],
    include_dirs=[_CSRC],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
