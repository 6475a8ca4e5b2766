/* ldfix native helpers: batched remote memory access, confined path
 * resolution and the ptrace calls used to freeze a target.
 *
 * Every function returns a non-negative value on success and -errno on
 * failure; nothing here prints, allocates or keeps state. */
#ifndef LDFIX_NATIVE_H
#define LDFIX_NATIVE_H

#include <stddef.h>
#include <stdint.h>

/* Read n regions of process pid into buf (the regions laid end to end).
 * done[i] receives the bytes transferred for region i (a region that faults
 * part way is short, one that faults at once is 0).  process_vm_readv is
 * used in batches of up to 1024 regions; when it is unavailable (ENOSYS,
 * EPERM from a seccomp filter) and memfd >= 0, pread on /proc/PID/mem is
 * used instead.  Returns 0, or -errno for an error that concerns the whole
 * process (ESRCH, EPERM, ...). */
int ldfix_vm_read(int pid, int memfd, size_t n, const uint64_t *addrs,
                  const uint64_t *lens, unsigned char *buf, int64_t *done);

/* The same for writing. */
int ldfix_vm_write(int pid, int memfd, size_t n, const uint64_t *addrs,
                   const uint64_t *lens, const unsigned char *buf,
                   int64_t *done);

/* openat2(rootfd, path, O_PATH, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS):
 * path is resolved as if rootfd were "/" (".." and absolute symlinks cannot
 * leave it).  Returns an O_PATH descriptor or -errno. */
int ldfix_open_in_root(int rootfd, const char *path);

/* Opens the regular file behind an O_PATH descriptor for reading.
 * Returns -EINVAL (not a regular file) or -EXDEV (on procfs/sysfs) without
 * opening anything else. */
int ldfix_open_regular(int pathfd);

int ldfix_ptrace_seize(int tid, unsigned long options);
int ldfix_ptrace_interrupt(int tid);
int ldfix_ptrace_detach(int tid, int sig);
/* waitpid(tid, status, options | __WALL); returns the pid or -errno. */
int ldfix_waitpid(int tid, int *status, int options);
/* kcmp(KCMP_VM): 0 when both processes share one address space, > 0 when
 * not, -errno on error. */
int ldfix_kcmp_vm(int pid1, int pid2);

/* Walks a doubly linked list in process pid: at each node reads read_size
 * bytes into buf (node i at i * read_size), records its address in addrs[i]
 * and the bytes read in lens[i], requires the 8-byte pointer at prev_off to
 * name the previous node (0 for the head), and follows the one at next_off.
 * Stops at a NULL next, after max nodes, at a node seen before, at a
 * misaligned pointer or one >= user_top, at a node with fewer than min_size
 * readable bytes, or at a prev mismatch; *stop says which (LDFIX_WALK_*), and
 * addrs[count] holds the address it stopped at (addrs has max + 1 slots).
 * Returns the number of nodes or -errno. */
enum {
    LDFIX_WALK_END, LDFIX_WALK_BUDGET, LDFIX_WALK_CYCLE, LDFIX_WALK_BAD_POINTER,
    LDFIX_WALK_UNREADABLE, LDFIX_WALK_PREV_MISMATCH
};
int ldfix_walk(int pid, int memfd, uint64_t head, uint32_t next_off,
               uint32_t prev_off, uint32_t read_size, uint32_t min_size,
               uint64_t user_top, size_t max, unsigned char *buf,
               uint64_t *addrs, uint32_t *lens, int *stop);

/* The repair's write, in one call for n 16-byte ids at addrs: checks that
 * every id still holds old[16*i..], writes new[16*i..] to all, reads them
 * back.  Returns 0 when all read back as written; LDFIX_SWAP_CHANGED_BASE + i
 * when id i no longer held its old value (nothing was written);
 * LDFIX_SWAP_UNWRITTEN_BASE + i when id i did not read back as written;
 * -errno on error.  scratch holds 16 * n bytes. */
#define LDFIX_SWAP_CHANGED_BASE 0x10000000
#define LDFIX_SWAP_UNWRITTEN_BASE 0x20000000
int ldfix_swap16(int pid, int memfd, size_t n, const uint64_t *addrs,
                 const unsigned char *old, const unsigned char *new_,
                 unsigned char *scratch, int64_t *done);

/* Re-links lists seen before: reads the next/prev words of every known node
 * (sorted or not) in one batch and follows each head through them, setting
 * reached[i] for every known node reachable with a prev that names its
 * predecessor.  Where a chain meets a node not in `known`, its address and
 * predecessor go to left_at/left_prev (nheads slots each) for the caller to
 * walk on.  Returns how many chains left the known nodes, or -errno. */
int ldfix_relink(int pid, int memfd, size_t nheads, const uint64_t *heads,
                 size_t nknown, const uint64_t *known, uint32_t next_off,
                 uint32_t prev_off, size_t limit, unsigned char *reached,
                 uint64_t *left_at, uint64_t *left_prev);

/* Build-ids, read the way ldfix.elf/identity read them (one definition of
 * the bounds): at most LDFIX_NOTE_COUNT PT_NOTE segments of at most
 * LDFIX_NOTE_MAX bytes each (larger ones are skipped), LDFIX_PHNUM_MAX
 * program headers; a build-id longer than LDFIX_BID_MAX is not decided here. */
#define LDFIX_NOTE_COUNT 8
#define LDFIX_NOTE_MAX 4096
#define LDFIX_PHNUM_MAX 256
#define LDFIX_BID_MAX 64
enum {
    LDFIX_BID_UNDECIDED = -2, /* malformed, unreadable, unusual: let the caller look */
    LDFIX_BID_NOT_READ = -1,  /* the file was not opened (its id is the stored one) */
    LDFIX_BID_NONE = 0        /* a well-formed ELF without a build-id note */
};

/* What ldfix_probe_files found for one path. */
struct ldfix_file {
    int32_t err;       /* 0, or -errno of the lookup (openat2, fstat) */
    int32_t open_err;  /* 0, or -errno of opening it for reading (see ldfix_open_regular) */
    int32_t bid_len;   /* the build-id's length (> 0), or LDFIX_BID_* */
    uint32_t reserved;
    uint64_t dev, ino, size;
    unsigned char bid[LDFIX_BID_MAX];
};

/* For each of n NUL-terminated paths (paths + offs[i]), resolved inside
 * rootfd as ldfix_open_in_root does: its current dev, ino and size; and,
 * when stored is not NULL and the id differs from (stored[2i], stored[2i+1]),
 * the file's build-id, the file being opened as ldfix_open_regular does.
 * Returns 0 (per-path errors are in out[i]). */
int ldfix_probe_files(int rootfd, size_t n, const char *paths, const uint32_t *offs,
                      const uint64_t *stored, struct ldfix_file *out);

/* The build-id of each mapped ELF image (ELF header at start[i], notes at
 * bias[i] + p_vaddr) in process pid, in three batched reads per 256 images:
 * bid_len[i] is its length (the bytes at bids + 64 * i) or LDFIX_BID_NONE /
 * LDFIX_BID_UNDECIDED.  Returns 0 or -errno (whole-process errors). */
int ldfix_image_build_ids(int pid, int memfd, size_t n, const uint64_t *bias,
                          const uint64_t *start, int32_t *bid_len, unsigned char *bids);

/* One mapping of a process, from the PROCMAP_QUERY ioctl on its
 * /proc/PID/maps (Linux >= 6.11): what one line of the file says, without
 * reading the whole file. */
struct ldfix_vma {
    uint64_t start, end, offset, ino;
    uint32_t dev_major, dev_minor;
    uint64_t flags;     /* 1 readable, 2 writable, 4 executable, 8 shared */
    uint32_t name_len;  /* bytes of the name in the caller's buffer */
    uint32_t reserved;
};

/* The mapping covering addr: 0, -ENOENT when nothing is mapped there,
 * -ENOTTY (or -EINVAL) when the kernel has no PROCMAP_QUERY, or -errno.  The
 * name (a path as the kernel prints it, or "[vdso]"...) goes to name when
 * name_size > 0 (-ENAMETOOLONG when it does not fit). */
int ldfix_vma_query(int mapsfd, uint64_t addr, struct ldfix_vma *out, char *name,
                    uint32_t name_size);

#endif
