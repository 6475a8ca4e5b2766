/* See ldfix_native.h. */
#define _GNU_SOURCE
#include "ldfix_native.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#define LDFIX_IOV_MAX 1024

static int use_fallback(int err)
{
    return err == ENOSYS || err == EPERM;
}

/* One pass of process_vm_{readv,writev} over regions [first, n).  Returns the
 * index of the first region not yet handled, or -errno. */
static ssize_t vm_batch(int pid, int write, size_t first, size_t n,
                        const uint64_t *addrs, const uint64_t *lens,
                        unsigned char *buf, const size_t *offs, int64_t *done)
{
    struct iovec local[LDFIX_IOV_MAX], remote[LDFIX_IOV_MAX];
    size_t cnt = n - first, i;
    ssize_t r;

    if (cnt > LDFIX_IOV_MAX)
        cnt = LDFIX_IOV_MAX;
    for (i = 0; i < cnt; i++) {
        local[i].iov_base = buf + offs[first + i];
        local[i].iov_len = lens[first + i];
        remote[i].iov_base = (void *)(uintptr_t)addrs[first + i];
        remote[i].iov_len = lens[first + i];
    }
    if (write)
        r = process_vm_writev(pid, local, cnt, remote, cnt, 0);
    else
        r = process_vm_readv(pid, local, cnt, remote, cnt, 0);
    if (r < 0) {
        if (errno == EFAULT) {
            /* Nothing transferred: the first region faults at once. */
            done[first] = 0;
            return (ssize_t)first + 1;
        }
        return -errno;
    }
    /* Attribute the byte count to regions in order; the region where the
     * transfer stopped gets what it got and the next pass starts after it. */
    for (i = 0; i < cnt; i++) {
        uint64_t want = lens[first + i];
        if ((uint64_t)r >= want) {
            done[first + i] = (int64_t)want;
            r -= (ssize_t)want;
            continue;
        }
        done[first + i] = r;
        return (ssize_t)(first + i + 1);
    }
    return (ssize_t)(first + cnt);
}

/* Writable ranges of pid from /proc/PID/maps, for the fallback's writes:
 * /proc/PID/mem writes through read-only and PROT_NONE pages (the kernel
 * forces them), where process_vm_writev refuses; the fallback must refuse
 * too.  Returns the number of ranges (in *out, malloc'd) or -errno. */
static long writable_ranges(int pid, uint64_t (**out)[2])
{
    char path[64], line[512];
    uint64_t (*r)[2] = NULL;
    long n = 0, cap = 0;
    FILE *f;

    snprintf(path, sizeof path, "/proc/%d/maps", pid);
    f = fopen(path, "re");
    if (!f)
        return -errno;
    while (fgets(line, sizeof line, f)) {
        unsigned long long lo, hi;
        char perms[5];
        if (strchr(line, '\n') == NULL && !feof(f)) {
            int c;
            while ((c = fgetc(f)) != EOF && c != '\n')
                ;  /* a long path: the fields we need came first */
        }
        if (sscanf(line, "%llx-%llx %4s", &lo, &hi, perms) != 3 || perms[1] != 'w')
            continue;
        if (n == cap) {
            uint64_t (*nr)[2];
            cap = cap ? 2 * cap : 256;
            nr = realloc(r, (size_t)cap * sizeof *r);
            if (!nr) {
                free(r);
                fclose(f);
                return -ENOMEM;
            }
            r = nr;
        }
        r[n][0] = lo;
        r[n][1] = hi;
        n++;
    }
    fclose(f);
    *out = r;
    return n;
}

static int in_ranges(uint64_t (*r)[2], long n, uint64_t addr, uint64_t len)
{
    long i;

    for (i = 0; i < n; i++)
        if (addr >= r[i][0] && addr + len <= r[i][1])
            return 1;
    return 0;
}

static int mem_fallback(int pid, int memfd, int write, size_t first, size_t n,
                        const uint64_t *addrs, const uint64_t *lens,
                        unsigned char *buf, const size_t *offs, int64_t *done)
{
    uint64_t (*ranges)[2] = NULL;
    long nranges = 0;
    size_t i;

    if (memfd < 0)
        return -ENOSYS;
    if (write) {
        nranges = writable_ranges(pid, &ranges);
        if (nranges < 0)
            return (int)nranges;
    }
    for (i = first; i < n; i++) {
        uint64_t got = 0;
        done[i] = 0;
        /* pread's offset is signed: an address at or above 2^63 (kernel
         * space) is a fault of this region, not an error of the batch. */
        if (addrs[i] >= (1ULL << 63) || lens[i] >= (1ULL << 63) - addrs[i])
            continue;
        if (write && !in_ranges(ranges, nranges, addrs[i], lens[i]))
            continue;
        while (got < lens[i]) {
            ssize_t r;
            if (write)
                r = pwrite(memfd, buf + offs[i] + got, lens[i] - got,
                           (off_t)(addrs[i] + got));
            else
                r = pread(memfd, buf + offs[i] + got, lens[i] - got,
                          (off_t)(addrs[i] + got));
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0 && (errno == EIO || errno == EFAULT || errno == EINVAL))
                break;
            if (r < 0) {
                free(ranges);
                return -errno;
            }
            if (r == 0)
                break;
            got += (uint64_t)r;
        }
        done[i] = (int64_t)got;
    }
    free(ranges);
    return 0;
}

static int vm_access(int pid, int memfd, int write, size_t n,
                     const uint64_t *addrs, const uint64_t *lens,
                     unsigned char *buf, int64_t *done)
{
    size_t offs_stack[256];
    size_t *offs = offs_stack, i, off = 0;
    size_t pos = 0;
    int ret = 0;

    if (n > 256) {
        /* The only allocation here; callers batch at most a few thousand. */
        offs = calloc(n, sizeof *offs);
        if (!offs)
            return -ENOMEM;
    }
    for (i = 0; i < n; i++) {
        offs[i] = off;
        off += lens[i];
        done[i] = 0;
    }
    while (pos < n) {
        ssize_t next = vm_batch(pid, write, pos, n, addrs, lens, buf, offs, done);
        if (next < 0) {
            if (use_fallback((int)-next))
                ret = mem_fallback(pid, memfd, write, pos, n, addrs, lens, buf, offs, done);
            else
                ret = (int)next;
            break;
        }
        pos = (size_t)next;
    }
    if (offs != offs_stack)
        free(offs);
    return ret;
}

int ldfix_vm_read(int pid, int memfd, size_t n, const uint64_t *addrs,
                  const uint64_t *lens, unsigned char *buf, int64_t *done)
{
    return vm_access(pid, memfd, 0, n, addrs, lens, buf, done);
}

int ldfix_vm_write(int pid, int memfd, size_t n, const uint64_t *addrs,
                   const uint64_t *lens, const unsigned char *buf,
                   int64_t *done)
{
    return vm_access(pid, memfd, 1, n, addrs, lens, (unsigned char *)buf, done);
}

int ldfix_open_in_root(int rootfd, const char *path)
{
    struct open_how how;
    long fd;

    memset(&how, 0, sizeof how);
    how.flags = O_PATH | O_CLOEXEC;
    how.resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS;
    fd = syscall(SYS_openat2, rootfd, path, &how, sizeof how);
    return fd < 0 ? -errno : (int)fd;
}

/* What a batch of reopens shares: /proc/self/fd opened once, and whether the
 * last device seen is procfs/sysfs (one fstatfs per file system, not per
 * file: a device number names one superblock). */
struct reopen_ctx {
    int fddir;      /* /proc/self/fd, or -1 */
    int have_dev;
    dev_t dev;
    int dev_err;    /* 0, or -EXDEV / -errno for that device */
};

/* The checks of ldfix_open_regular on a descriptor already fstat()ed. */
static int reopen_regular(int pathfd, const struct stat *st, struct reopen_ctx *ctx)
{
    struct statfs sfs;
    char link[64];
    int fd, err;

    if (!S_ISREG(st->st_mode))
        return -EINVAL;
    if (ctx && ctx->have_dev && ctx->dev == st->st_dev) {
        err = ctx->dev_err;
    } else {
        err = 0;
        if (fstatfs(pathfd, &sfs) < 0)
            err = -errno;
        else if (sfs.f_type == PROC_SUPER_MAGIC || sfs.f_type == SYSFS_MAGIC)
            err = -EXDEV;
        if (ctx && err != -EINTR) {
            ctx->have_dev = 1;
            ctx->dev = st->st_dev;
            ctx->dev_err = err;
        }
    }
    if (err)
        return err;
    /* Reopening the O_PATH descriptor through its magic link opens the very
     * inode looked up, for reading, and never a device or a FIFO (checked
     * above on that inode). */
    if (ctx && ctx->fddir >= 0) {
        snprintf(link, sizeof link, "%d", pathfd);
        fd = openat(ctx->fddir, link, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    } else {
        snprintf(link, sizeof link, "/proc/self/fd/%d", pathfd);
        fd = open(link, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    }
    return fd < 0 ? -errno : fd;
}

int ldfix_open_regular(int pathfd)
{
    struct stat st;

    if (fstat(pathfd, &st) < 0)
        return -errno;
    return reopen_regular(pathfd, &st, NULL);
}

/* ---- build-ids --------------------------------------------------------- */

#define PT_LOAD_ 1
#define PT_NOTE_ 4
#define NT_GNU_BUILD_ID_ 3
#define PHDR_SIZE_ 56

static uint16_t get16(const unsigned char *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static uint32_t get32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static uint64_t get64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* The GNU build-id among the notes in data[0..len): its length (copied to
 * bid when it fits), 0 when there is none or a note is malformed (the rest
 * of the segment is then not trusted), LDFIX_BID_UNDECIDED when it is longer
 * than LDFIX_BID_MAX. */
static int find_build_id(const unsigned char *data, size_t len, unsigned char *bid)
{
    size_t pos = 0;

    while (pos + 12 <= len) {
        uint32_t namesz = get32(data + pos), descsz = get32(data + pos + 4);
        uint32_t type = get32(data + pos + 8);
        size_t name_end, desc_end;

        if (namesz > 256 || descsz > 1024)
            return 0;
        name_end = pos + 12 + ((namesz + 3) & ~3u);
        desc_end = name_end + ((descsz + 3) & ~3u);
        if (desc_end > len)
            return 0;
        if (type == NT_GNU_BUILD_ID_ && namesz == 4 && memcmp(data + pos + 12, "GNU", 4) == 0) {
            if (descsz == 0)
                return 0;
            if (descsz > LDFIX_BID_MAX)
                return LDFIX_BID_UNDECIDED;
            memcpy(bid, data + name_end, descsz);
            return (int)descsz;
        }
        pos = desc_end;
    }
    return 0;
}

/* Up to LDFIX_NOTE_COUNT PT_NOTE segments of at most LDFIX_NOTE_MAX bytes,
 * in program header order: (offset, vaddr, size) each; returns the count. */
static int note_segments(const unsigned char *ph, unsigned phnum, uint64_t (*notes)[3])
{
    unsigned i;
    int k = 0;

    for (i = 0; i < phnum && k < LDFIX_NOTE_COUNT; i++) {
        const unsigned char *p = ph + (size_t)i * PHDR_SIZE_;
        uint64_t filesz = get64(p + 32);
        if (get32(p) == PT_NOTE_ && filesz <= LDFIX_NOTE_MAX) {
            notes[k][0] = get64(p + 8);
            notes[k][1] = get64(p + 16);
            notes[k][2] = filesz;
            k++;
        }
    }
    return k;
}

/* The build-id of the ELF file open at fd (size bytes), or LDFIX_BID_*. */
static int file_build_id(int fd, uint64_t size, unsigned char *bid)
{
    /* The headers and notes of a shared object sit in its first few hundred
     * bytes; what lies further is read where it is. */
    unsigned char head[1024], ph[LDFIX_PHNUM_MAX * PHDR_SIZE_], note[LDFIX_NOTE_MAX];
    size_t hn = size < sizeof head ? (size_t)size : sizeof head;
    uint64_t phoff, notes[LDFIX_NOTE_COUNT][3];
    unsigned phnum, phentsize;
    const unsigned char *phs;
    int k, i;

    if (hn < 64 || pread(fd, head, hn, 0) != (ssize_t)hn)
        return LDFIX_BID_UNDECIDED;
    if (memcmp(head, "\177ELF", 4) != 0 || head[4] != 2 || head[5] != 1)
        return LDFIX_BID_UNDECIDED;
    phoff = get64(head + 32);
    phentsize = get16(head + 54);
    phnum = get16(head + 56);
    if ((phentsize != 0 && phentsize != PHDR_SIZE_) || phnum > LDFIX_PHNUM_MAX)
        return LDFIX_BID_UNDECIDED;
    if (phoff > size || (uint64_t)phnum * PHDR_SIZE_ > size - phoff)
        return LDFIX_BID_UNDECIDED;
    if (phoff + (uint64_t)phnum * PHDR_SIZE_ <= hn) {
        phs = head + phoff;
    } else {
        if (pread(fd, ph, (size_t)phnum * PHDR_SIZE_, (off_t)phoff) != (ssize_t)(phnum * PHDR_SIZE_))
            return LDFIX_BID_UNDECIDED;
        phs = ph;
    }
    k = note_segments(phs, phnum, notes);
    for (i = 0; i < k; i++) {
        uint64_t off = notes[i][0], len = notes[i][2];
        const unsigned char *data;
        int r;
        if (off > size || len > size - off)
            return LDFIX_BID_UNDECIDED;
        if (off + len <= hn) {
            data = head + off;
        } else {
            if (pread(fd, note, (size_t)len, (off_t)off) != (ssize_t)len)
                return LDFIX_BID_UNDECIDED;
            data = note;
        }
        r = find_build_id(data, (size_t)len, bid);
        if (r != 0)
            return r;
    }
    return LDFIX_BID_NONE;
}

int ldfix_probe_files(int rootfd, size_t n, const char *paths, const uint32_t *offs,
                      const uint64_t *stored, struct ldfix_file *out)
{
    struct reopen_ctx ctx = { .fddir = -1 };
    size_t i;

    if (stored)
        ctx.fddir = open("/proc/self/fd", O_PATH | O_DIRECTORY | O_CLOEXEC);
    for (i = 0; i < n; i++) {
        struct ldfix_file *f = &out[i];
        struct stat st;
        int pfd, fd;

        memset(f, 0, sizeof *f);
        f->bid_len = LDFIX_BID_NOT_READ;
        pfd = ldfix_open_in_root(rootfd, paths + offs[i]);
        if (pfd < 0) {
            f->err = pfd;
            continue;
        }
        if (fstat(pfd, &st) < 0) {
            f->err = -errno;
            close(pfd);
            continue;
        }
        f->dev = st.st_dev;
        f->ino = st.st_ino;
        f->size = (uint64_t)st.st_size;
        if (stored && !(stored[2 * i] == f->dev && stored[2 * i + 1] == f->ino)) {
            fd = reopen_regular(pfd, &st, &ctx);
            if (fd < 0) {
                f->open_err = fd;
            } else {
                f->bid_len = file_build_id(fd, f->size, f->bid);
                close(fd);
            }
        }
        close(pfd);
    }
    if (ctx.fddir >= 0)
        close(ctx.fddir);
    return 0;
}

static int ptrace_ret(long r)
{
    return r < 0 ? -errno : 0;
}

int ldfix_ptrace_seize(int tid, unsigned long options)
{
    return ptrace_ret(ptrace(PTRACE_SEIZE, tid, 0, (void *)options));
}

int ldfix_ptrace_interrupt(int tid)
{
    return ptrace_ret(ptrace(PTRACE_INTERRUPT, tid, 0, 0));
}

int ldfix_ptrace_detach(int tid, int sig)
{
    return ptrace_ret(ptrace(PTRACE_DETACH, tid, 0, (void *)(long)sig));
}

int ldfix_waitpid(int tid, int *status, int options)
{
    pid_t r;

    do
        r = waitpid(tid, status, options | __WALL);
    while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : (int)r;
}

int ldfix_kcmp_vm(int pid1, int pid2)
{
    long r = syscall(SYS_kcmp, pid1, pid2, 1 /* KCMP_VM */, 0, 0);
    return r < 0 ? -errno : (int)r;
}

/* Visited-node set for ldfix_walk: open addressing over a power-of-two table. */
static int seen_insert(uint64_t *table, size_t mask, uint64_t addr)
{
    size_t i = (size_t)((addr >> 3) * 0x9E3779B97F4A7C15ULL) & mask;

    while (table[i]) {
        if (table[i] == addr)
            return 0;
        i = (i + 1) & mask;
    }
    table[i] = addr;
    return 1;
}

int ldfix_walk(int pid, int memfd, uint64_t head, uint32_t next_off,
               uint32_t prev_off, uint32_t read_size, uint32_t min_size,
               uint64_t user_top, size_t max, unsigned char *buf,
               uint64_t *addrs, uint32_t *lens, int *stop)
{
    size_t n = 0, cap = 64, mask;
    uint64_t *seen, prev = 0, addr = head;
    int ret = 0;

    while (cap < 2 * max + 2)
        cap <<= 1;
    mask = cap - 1;
    seen = calloc(cap, sizeof *seen);
    if (!seen)
        return -ENOMEM;
    *stop = LDFIX_WALK_END;
    while (addr) {
        int64_t done = 0;
        uint64_t next, back;
        unsigned char *node;

        if (n >= max) {
            *stop = LDFIX_WALK_BUDGET;
            break;
        }
        if (addr % 8 || addr >= user_top) {
            *stop = LDFIX_WALK_BAD_POINTER;
            break;
        }
        if (!seen_insert(seen, mask, addr)) {
            *stop = LDFIX_WALK_CYCLE;
            break;
        }
        node = buf + n * (size_t)read_size;
        {
            uint64_t len = read_size;
            ret = vm_access(pid, memfd, 0, 1, &addr, &len, node, &done);
        }
        if (ret < 0)
            break;
        if (done < (int64_t)min_size || done < (int64_t)next_off + 8 || done < (int64_t)prev_off + 8) {
            *stop = LDFIX_WALK_UNREADABLE;
            break;
        }
        memcpy(&back, node + prev_off, 8);
        if (back != prev) {
            *stop = LDFIX_WALK_PREV_MISMATCH;
            break;
        }
        memcpy(&next, node + next_off, 8);
        addrs[n] = addr;
        lens[n] = (uint32_t)done;
        n++;
        prev = addr;
        addr = next;
    }
    if (*stop != LDFIX_WALK_END || ret < 0)
        addrs[n] = addr;  /* where it stopped, for the message */
    free(seen);
    return ret < 0 ? ret : (int)n;
}

int ldfix_swap16(int pid, int memfd, size_t n, const uint64_t *addrs,
                 const unsigned char *old, const unsigned char *new_,
                 unsigned char *scratch, int64_t *done)
{
    uint64_t *lens;
    size_t i;
    int ret;

    lens = malloc((n ? n : 1) * sizeof *lens);
    if (!lens)
        return -ENOMEM;
    for (i = 0; i < n; i++)
        lens[i] = 16;
    /* 1. every id must still hold its old value */
    ret = vm_access(pid, memfd, 0, n, addrs, lens, scratch, done);
    if (ret < 0)
        goto out;
    for (i = 0; i < n; i++) {
        if (done[i] != 16 || memcmp(scratch + 16 * i, old + 16 * i, 16) != 0) {
            ret = LDFIX_SWAP_CHANGED_BASE + (int)i;
            goto out;
        }
    }
    /* 2. write all, 3. read back */
    ret = vm_access(pid, memfd, 1, n, addrs, lens, (unsigned char *)new_, done);
    if (ret < 0)
        goto out;
    for (i = 0; i < n; i++) {
        if (done[i] != 16) {
            ret = LDFIX_SWAP_UNWRITTEN_BASE + (int)i;
            goto out;
        }
    }
    ret = vm_access(pid, memfd, 0, n, addrs, lens, scratch, done);
    if (ret < 0)
        goto out;
    for (i = 0; i < n; i++) {
        if (done[i] != 16 || memcmp(scratch + 16 * i, new_ + 16 * i, 16) != 0) {
            ret = LDFIX_SWAP_UNWRITTEN_BASE + (int)i;
            goto out;
        }
    }
    ret = 0;
out:
    free(lens);
    return ret;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int ldfix_relink(int pid, int memfd, size_t nheads, const uint64_t *heads,
                 size_t nknown, const uint64_t *known, uint32_t next_off,
                 uint32_t prev_off, size_t limit, unsigned char *reached,
                 uint64_t *left_at, uint64_t *left_prev)
{
    uint32_t lo = next_off < prev_off ? next_off : prev_off;
    uint32_t span = (next_off > prev_off ? next_off : prev_off) + 8 - lo;
    uint64_t *addrs = NULL, *lens = NULL, *sorted = NULL;
    unsigned char *words = NULL;
    int64_t *done = NULL;
    size_t i, h;
    int ret = 0, left = 0;

    addrs = malloc((nknown + 1) * sizeof *addrs);
    lens = malloc((nknown + 1) * sizeof *lens);
    sorted = malloc((nknown + 1) * 2 * sizeof *sorted);
    words = malloc((nknown + 1) * span);
    done = malloc((nknown + 1) * sizeof *done);
    if (!addrs || !lens || !sorted || !words || !done) {
        ret = -ENOMEM;
        goto out;
    }
    for (i = 0; i < nknown; i++) {
        addrs[i] = known[i] + lo;
        lens[i] = span;
        reached[i] = 0;
        sorted[2 * i] = known[i];
        sorted[2 * i + 1] = i;
    }
    ret = vm_access(pid, memfd, 0, nknown, addrs, lens, words, done);
    if (ret < 0)
        goto out;
    /* (address, index) pairs sorted by address, for lookups while following. */
    qsort(sorted, nknown, 2 * sizeof *sorted, cmp_u64);
    for (h = 0; h < nheads; h++) {
        uint64_t prev = 0, addr = heads[h];
        size_t steps = 0;
        while (addr && steps < limit) {
            uint64_t key[2] = {addr, 0}, next, back;
            uint64_t *hit = bsearch(key, sorted, nknown, 2 * sizeof *sorted, cmp_u64);
            size_t k;
            if (!hit) {
                /* A node the plan did not see: the caller walks on from here. */
                left_at[left] = addr;
                left_prev[left] = prev;
                left++;
                break;
            }
            k = (size_t)hit[1];
            if (done[k] != (int64_t)span || reached[k])
                break;
            memcpy(&next, words + k * span + (next_off - lo), 8);
            memcpy(&back, words + k * span + (prev_off - lo), 8);
            if (back != prev)
                break;
            reached[k] = 1;
            steps++;
            prev = addr;
            addr = next;
        }
    }
    ret = left;
out:
    free(addrs);
    free(lens);
    free(sorted);
    free(words);
    free(done);
    return ret;
}

/* Reads n regions packed end to end into buf; off[i] receives where region i
 * starts in buf. */
static int read_packed(int pid, int memfd, size_t n, const uint64_t *addrs,
                       const uint64_t *lens, unsigned char *buf, size_t *off,
                       int64_t *done)
{
    size_t i, at = 0;

    for (i = 0; i < n; i++) {
        off[i] = at;
        at += lens[i];
    }
    return vm_access(pid, memfd, 0, n, addrs, lens, buf, done);
}

/* A region of len bytes at addr, or an empty one where addr + len would
 * leave the 64-bit space (such a region reads as nothing). */
static void region(uint64_t *addr_out, uint64_t *len_out, uint64_t addr, uint64_t len)
{
    *addr_out = addr;
    *len_out = addr > UINT64_MAX - len ? 0 : len;
}

int ldfix_image_build_ids(int pid, int memfd, size_t n, const uint64_t *bias,
                          const uint64_t *start, int32_t *bid_len, unsigned char *bids)
{
    enum { CHUNK = 256, NOTES = CHUNK * LDFIX_NOTE_COUNT };
    uint64_t *addrs, *lens;
    size_t *off;
    int64_t *done;
    unsigned char *buf;
    size_t first, i;
    int ret = 0;

    addrs = malloc(NOTES * sizeof *addrs);
    lens = malloc(NOTES * sizeof *lens);
    off = malloc(NOTES * sizeof *off);
    done = malloc(NOTES * sizeof *done);
    /* Big enough for a chunk's notes, which exceeds its program headers. */
    buf = malloc((size_t)NOTES * LDFIX_NOTE_MAX);
    if (!addrs || !lens || !off || !done || !buf) {
        ret = -ENOMEM;
        goto out;
    }
    /* Chunk by chunk: memory stays bounded whatever the target claims. */
    for (first = 0; first < n; first += CHUNK) {
        size_t cnt = n - first < CHUNK ? n - first : CHUNK, k;
        unsigned char heads[CHUNK][64];
        uint64_t notes[CHUNK][LDFIX_NOTE_COUNT][3];
        int nnotes[CHUNK];

        /* 1. the ELF headers */
        for (i = 0; i < cnt; i++)
            region(&addrs[i], &lens[i], start[first + i], 64);
        if ((ret = read_packed(pid, memfd, cnt, addrs, lens, buf, off, done)) < 0)
            goto out;
        for (i = 0; i < cnt; i++) {
            const unsigned char *h = buf + off[i];
            unsigned phnum;
            bid_len[first + i] = LDFIX_BID_UNDECIDED;
            memset(heads[i], 0, 64);
            if (done[i] == 64)
                memcpy(heads[i], h, 64);
            /* 2. then the program headers of the well-formed ones */
            phnum = done[i] == 64 && memcmp(h, "\177ELF", 4) == 0 && h[4] == 2 && h[5] == 1 &&
                    get16(h + 54) == PHDR_SIZE_ && get16(h + 56) <= LDFIX_PHNUM_MAX ? get16(h + 56) : 0;
            region(&addrs[i], &lens[i], start[first + i] + get64(heads[i] + 32),
                   (uint64_t)phnum * PHDR_SIZE_);
            if (!phnum || start[first + i] + get64(heads[i] + 32) < start[first + i])
                lens[i] = 0;
        }
        if ((ret = read_packed(pid, memfd, cnt, addrs, lens, buf, off, done)) < 0)
            goto out;
        for (i = 0; i < cnt; i++) {
            nnotes[i] = -1;  /* headers unreadable: undecided */
            if (lens[i] == 0 || done[i] != (int64_t)lens[i])
                continue;
            nnotes[i] = note_segments(buf + off[i], (unsigned)(lens[i] / PHDR_SIZE_), notes[i]);
        }
        /* 3. the notes, at load bias + p_vaddr (modulo 2^64, as the loader
         * computes it) */
        k = 0;
        for (i = 0; i < cnt; i++) {
            int j;
            for (j = 0; j < nnotes[i]; j++, k++)
                region(&addrs[k], &lens[k], bias[first + i] + notes[i][j][1], notes[i][j][2]);
        }
        if ((ret = read_packed(pid, memfd, k, addrs, lens, buf, off, done)) < 0)
            goto out;
        k = 0;
        for (i = 0; i < cnt; i++) {
            int j, r = 0;
            if (nnotes[i] < 0)
                continue;
            /* A note that faults part way is parsed as far as it was read. */
            for (j = 0; j < nnotes[i]; j++, k++)
                if (r == 0)
                    r = find_build_id(buf + off[k], (size_t)done[k], bids + (first + i) * LDFIX_BID_MAX);
            bid_len[first + i] = r ? r : LDFIX_BID_NONE;
        }
    }
out:
    free(addrs);
    free(lens);
    free(off);
    free(done);
    free(buf);
    return ret;
}

/* struct procmap_query of <linux/fs.h> (Linux 6.11), spelled out: the
 * headers this is built against may predate it. */
struct procmap_query_ {
    uint64_t size, query_flags, query_addr;
    uint64_t vma_start, vma_end, vma_flags, vma_page_size, vma_offset, inode;
    uint32_t dev_major, dev_minor, vma_name_size, build_id_size;
    uint64_t vma_name_addr, build_id_addr;
};
#define PROCMAP_QUERY_ _IOWR('f', 17, struct procmap_query_)

int ldfix_vma_query(int mapsfd, uint64_t addr, struct ldfix_vma *out, char *name,
                    uint32_t name_size)
{
    struct procmap_query_ q;

    memset(&q, 0, sizeof q);
    q.size = sizeof q;
    q.query_addr = addr;  /* flags 0: the mapping covering addr, or ENOENT */
    if (name && name_size) {
        q.vma_name_addr = (uint64_t)(uintptr_t)name;
        q.vma_name_size = name_size;
    }
    if (ioctl(mapsfd, PROCMAP_QUERY_, &q) < 0)
        return -errno;
    memset(out, 0, sizeof *out);
    out->start = q.vma_start;
    out->end = q.vma_end;
    out->offset = q.vma_offset;
    out->ino = q.inode;
    out->dev_major = q.dev_major;
    out->dev_minor = q.dev_minor;
    out->flags = q.vma_flags;
    /* vma_name_size comes back counting the terminating NUL (0: no name) */
    out->name_len = name && name_size && q.vma_name_size ? q.vma_name_size - 1 : 0;
    return 0;
}
