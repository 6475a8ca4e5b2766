/* libldfix_agent: the in-process repair, as a preload library.
 *
 *     LD_PRELOAD=$(ldfix agent-path) my-program
 *
 * After a checkpoint/restore every mapped file has a new (st_dev, st_ino).
 * The dynamic loader remembers the old pair for each object it loaded and
 * compares it when a later dlopen() reaches the same file by another path:
 * the comparison fails and a second copy is loaded.  This library keeps that
 * comparison right from inside the process, with no privileges and no hook:
 *
 *  1. CALIBRATION (constructor, before any checkpoint).  At that moment the
 *     loader's stored id of this very library equals fstat() of its file, so
 *     scanning a bounded window of its own struct link_map (glibc) / struct
 *     dso (musl) for those 16 bytes gives the offset where this loader keeps
 *     ids.  It is trusted only if the hit is unique and cross-checked:
 *     every other object's 16 bytes at that offset equal its file's id where
 *     they are set, the main program, the vdso and ld.so hold zeros there,
 *     glibc needs at least one other object with a distinct matching id, and
 *     the neighbouring members have the shape they must have (glibc: the
 *     l_scope_max/l_scope/l_local_scope signature and l_real == self; musl:
 *     map/map_len, just before dev, describe this library's own mapping).
 *     Anything else: the agent stays inert (dlopen passes straight through),
 *     and says why on stderr if LDFIX_AGENT_DEBUG is set (silent otherwise,
 *     so that a program's output is the same with and without the agent).
 *
 *  2. DETECTION (each dlopen/dlmopen).  One stat() of this library's own
 *     path, compared with the id it had last (initially: the id the loader
 *     stored for it).  A restore onto another file system changes it.  This
 *     is the only cost on the hot path (no lock, no allocation).
 *
 *  3. REPAIR (only when 2 fires, or when ldfix_repair() is called).  For every
 *     object in every namespace whose stored id is set and differs from what
 *     stat() of its recorded path gives now, and whose file holds what is
 *     mapped (same GNU build-id in the mapped image and in the file; without
 *     build-ids on either side: same ELF header + program headers and same
 *     first page), the current id is written; `changed` (other content),
 *     `missing` and `unset` (zero) ids are never written; neither are the
 *     main program, ld.so, the vdso, or glibc's proxy maps.  These are the
 *     statuses and rules of `ldfix fix`.  See repair() for how it is
 *     serialised against the process's own dlopen()/dlclose() calls.
 *
 * Then the real dlopen() runs, entered by a tail jump so that it sees the
 * original caller's return address (glibc uses it for the caller's
 * namespace, its DT_RUNPATH and $ORIGIN): nothing else changes.
 *
 * Exported: dlopen, dlmopen (glibc), ldfix_repair(), ldfix_agent_status().
 * Environment: LDFIX_AGENT_DEBUG=1 (say what happens, on stderr),
 * LDFIX_AGENT_DISABLE=1 (stay inert), LDFIX_AGENT_LOCK=write (glibc: do not
 * use the load lock, rely on the write lock alone, as when the load lock
 * cannot be verified; for tests and diagnosis).
 *
 * Written from the published facts in reference/loader-layouts.md (offsets,
 * what the loaders compare); no glibc or musl code is copied here. */
#define _GNU_SOURCE
#define _FILE_OFFSET_BITS 64
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <limits.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#ifdef __GLIBC__
#include <gnu/libc-version.h>
#define AGENT_GLIBC 1
#else
#define AGENT_GLIBC 0
#endif

#define API __attribute__((visibility("default")))
#define HIDDEN __attribute__((visibility("hidden")))

#if UINTPTR_MAX > 0xffffffffu
#define PTR 8
typedef Elf64_Ehdr Ehdr;
typedef Elf64_Phdr Phdr;
#define MY_CLASS ELFCLASS64
#else
#define PTR 4
typedef Elf32_Ehdr Ehdr;
typedef Elf32_Phdr Phdr;
#define MY_CLASS ELFCLASS32
#endif

/* Calibration window.  glibc: l_file_id lies between 920 and 1008 on 64-bit
 * (472..504 on i386) in every release 2.17..master, and struct link_map is
 * always well over 1080 (560) bytes, so the window never leaves the struct.
 * musl: struct dso is 368 (196) bytes, dev/ino at 152 (76).  A future layout
 * that moves the id beyond the window makes the agent inert, not wrong. */
#if AGENT_GLIBC
#define WINDOW (PTR == 8 ? 1080 : 560)
#else
#define WINDOW (PTR == 8 ? 368 : 196)
#endif

#define MAX_MAPS 4096      /* objects considered per repair */
#define MAX_CHAIN 65536    /* bound on any list walk (cycles, hostile memory) */
#define MAX_NS 16          /* glibc DL_NNS */
#define MAX_NOTES 8
#define MAX_NOTE 65536
#define MAX_PHNUM 256
#define BUSY_WAIT_NS (2L * 1000 * 1000 * 1000)

enum { ST_UNINIT = 0, ST_ACTIVE = 1, ST_INERT = 2 };

static struct {
    int state;
    int debug;
    size_t id_off;                 /* where the loader keeps (dev, ino) */
    size_t phdr_off, phnum_off;    /* where it keeps the program headers */
    size_t libname_off;            /* glibc l_libname, when verified (else 0) */
    struct link_map *self;         /* this library's map / dso */
    struct link_map *head;         /* namespace 0's first map: the program */
    struct r_debug *rdebug;        /* from the program's DT_DEBUG, or NULL */
    uintptr_t at_base, at_vdso;
    char self_path[PATH_MAX];
    uint64_t base_dev, base_ino;   /* the agent's own id as last seen */
    pthread_mutex_t *load_lock;    /* glibc _dl_load_lock, only when verified */
    char status[768];  /* sizeof(struct msg.buf) */
    unsigned long repairs, rewritten_total;
} ag;

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t agent_mutex = PTHREAD_MUTEX_INITIALIZER;

/* Read by the entry stubs below (hidden: a PC-relative load, no GOT). */
HIDDEN void *(*ldfix_real_dlopen)(const char *, int);
#if AGENT_GLIBC
HIDDEN void *(*ldfix_real_dlmopen)(Lmid_t, const char *, int);
#endif
HIDDEN void ldfix_agent_hook(void);
HIDDEN void ldfix_agent_hook_open(const char *file);

/* ---------------------------------------------------------------- output */

struct msg {
    char buf[768];
    size_t n;
};

static void m_s(struct msg *m, const char *s)
{
    while (s && *s && m->n < sizeof m->buf - 2)
        m->buf[m->n++] = *s++;
}

static void m_u(struct msg *m, unsigned long long v, unsigned base)
{
    char tmp[24];
    int i = 0;

    if (base == 16)
        m_s(m, "0x");
    do {
        tmp[i++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v && i < (int)sizeof tmp);
    while (i && m->n < sizeof m->buf - 2)
        m->buf[m->n++] = tmp[--i];
}

static void m_id(struct msg *m, uint64_t dev, uint64_t ino)
{
    m_u(m, dev, 10);
    m_s(m, ":");
    m_u(m, ino, 10);
}

static void m_say(struct msg *m)
{
    ssize_t r;

    if (!ag.debug)
        return;
    m->buf[m->n++] = '\n';
    r = write(2, m->buf, m->n);
    (void)r;
}

static void set_status(const struct msg *m)
{
    size_t n = m->n < sizeof ag.status - 1 ? m->n : sizeof ag.status - 1;

    memcpy(ag.status, m->buf, n);
    ag.status[n] = 0;
}

static void say(const char *a, const char *b)
{
    struct msg m = {.n = 0};

    m_s(&m, "ldfix-agent: ");
    m_s(&m, a);
    m_s(&m, b);
    m_say(&m);
}

/* ------------------------------------------------------- small helpers */

static uint64_t load64(const void *p)
{
    return *(const volatile uint64_t *)p;
}

static void store64(void *p, uint64_t v)
{
    *(volatile uint64_t *)p = v;
}

static int id_at(const struct link_map *l, uint64_t *dev, uint64_t *ino)
{
    *dev = load64((const char *)l + ag.id_off);
    *ino = load64((const char *)l + ag.id_off + 8);
    return *dev != 0 || *ino != 0;
}

static int stat_path(const char *path, struct stat *st)
{
    return fstatat(AT_FDCWD, path, st, 0);
}

static struct link_map *real_of(const struct link_map *l)
{
    /* glibc l_real: right after the public l_addr, l_name, l_ld, l_next,
     * l_prev, in every release (+40 / +20). */
    return *(struct link_map *const *)((const char *)l + 5 * PTR);
}

static uintptr_t dt_value(const ElfW(Dyn) *d, long tag)
{
    int i;

    for (i = 0; d && i < 4096 && d[i].d_tag != DT_NULL; i++)
        if (d[i].d_tag == tag)
            return (uintptr_t)d[i].d_un.d_ptr;
    return 0;
}

/* -------------------------------------------------------- calibration */

static int inert(const char *why)
{
    struct msg m = {.n = 0};

    m_s(&m, "inert: ");
    m_s(&m, why);
    set_status(&m);
    say("inert (dlopen passes straight through): ", why);
    return 0;
}

#if AGENT_GLIBC
/* glibc's _dl_load_lock, at _rtld_global + this (reference T3), per release. */
static long table_load_lock(int minor)
{
#if defined(__x86_64__)
    return minor <= 31 ? 2312 : minor <= 34 ? 2440 : minor <= 41 ? 2568 : 1800;
#elif defined(__aarch64__)
    return minor <= 31 ? 2440 : minor <= 34 ? 2568 : minor <= 41 ? 2696 : 1928;
#elif defined(__i386__)
    return minor <= 30 ? 1220 : minor == 31 ? 1284 : minor <= 34 ? 1348 : minor <= 41 ? 1412 : 1028;
#else
    (void)minor;
    return -1;
#endif
}

static char *rg_base;
static size_t rg_size;
static pid_t my_tid;
static long held_outside[8], held_inside[8];
static int n_outside, n_inside;

static int owned_by_me(const pthread_mutex_t *m)
{
    return m->__data.__owner == my_tid && m->__data.__count >= 1 &&
           (m->__data.__kind & 3) == PTHREAD_MUTEX_RECURSIVE_NP;
}

static void scan_held(long *out, int *n)
{
    size_t off;

    *n = 0;
    for (off = 0; off + sizeof(pthread_mutex_t) <= rg_size; off += _Alignof(pthread_mutex_t))
        if (owned_by_me((const pthread_mutex_t *)(rg_base + off)) && *n < 8)
            out[(*n)++] = (long)off;
}

static int held_cb(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)info;
    (void)size;
    (void)data;
    scan_held(held_inside, &n_inside);
    return 1;
}

/* Find glibc's load lock, and trust it only when two sources agree.
 *
 * Why take it at all: the loader compares ids in _dl_map_object_from_fd under
 * _dl_load_lock alone (the write lock that dl_iterate_phdr holds guards only
 * list changes).  Holding the load lock while writing excludes every load and
 * unload in the process, including libc's own (NSS, iconv, libgcc_s), which
 * do not go through our dlopen: no dlopen can read an id half-written.  It is
 * a recursive pthread mutex (glibc >= 2.34 locks it with pthread_mutex_lock
 * itself), so a dlopen() made from a constructor, i.e. with the lock already
 * held by this thread, still works; and we take it first, before the write
 * lock (inside dl_iterate_phdr), which is glibc's own order.
 *
 * How it is found: (1) inside dl_iterate_phdr's callback exactly one
 * recursive mutex in _rtld_global is newly owned by this thread: the write
 * lock; the load lock is the mutex right before it (they are declared side by
 * side), also recursive, preceded by _dl_nns (1..16).  (2) The published
 * offset for this glibc release (T3) must be the same.  Otherwise (unknown
 * release, a patched loader, glibc < 2.34 without threads where the lock
 * records no owner) the repair relies on the write lock alone; see repair(). */
static void find_load_lock(void)
{
    const ElfW(Sym) *sym = NULL;
    Dl_info di;
    long w = -1, l, want;
    int i, j, major = 0, minor = 0;
    const char *v = gnu_get_libc_version();
    const pthread_mutex_t *lm, *wm;
    size_t nns;

    rg_base = dlsym(RTLD_DEFAULT, "_rtld_global");
    if (!rg_base || !dladdr1(rg_base, &di, (void **)&sym, RTLD_DL_SYMENT) || !sym ||
        (char *)di.dli_saddr != rg_base) {
        say("load lock: ", "no _rtld_global symbol; serialising on the write lock only");
        return;
    }
    rg_size = sym->st_size;
    my_tid = (pid_t)syscall(SYS_gettid);
    scan_held(held_outside, &n_outside);
    dl_iterate_phdr(held_cb, NULL);
    for (i = 0; i < n_inside; i++) {
        for (j = 0; j < n_outside && held_outside[j] != held_inside[i]; j++)
            ;
        if (j == n_outside) {
            if (w >= 0) {
                w = -2;
                break;
            }
            w = held_inside[i];
        }
    }
    while (*v && (*v < '0' || *v > '9'))
        v++;
    major = atoi(v);
    v = strchr(v, '.');
    minor = v ? atoi(v + 1) : 0;
    want = major == 2 ? table_load_lock(minor) : -1;
    l = w - (long)sizeof(pthread_mutex_t);
    if (w < 0 || l < (long)sizeof(size_t)) {
        say("load lock: ", "the loader's write lock was not found; serialising on the write lock only");
        return;
    }
    lm = (const pthread_mutex_t *)(rg_base + l);
    wm = (const pthread_mutex_t *)(rg_base + w);
    memcpy(&nns, rg_base + l - sizeof(size_t), sizeof nns);
    if (lm->__data.__kind != wm->__data.__kind || (wm->__data.__kind & 3) != PTHREAD_MUTEX_RECURSIVE_NP ||
        nns < 1 || nns > MAX_NS || l != want) {
        struct msg m = {.n = 0};
        m_s(&m, "ldfix-agent: load lock: calibrated _rtld_global+");
        m_u(&m, (unsigned long long)l, 10);
        m_s(&m, ", published +");
        m_u(&m, (unsigned long long)want, 10);
        m_s(&m, " for glibc ");
        m_s(&m, gnu_get_libc_version());
        m_s(&m, ": not trusted; serialising on the write lock only");
        m_say(&m);
        return;
    }
    ag.load_lock = (pthread_mutex_t *)(rg_base + l);
}
#endif

/* Check the calibrated offset on every other object of namespace 0. */
static int cross_check(uint64_t sdev, uint64_t sino, const char **why)
{
    struct link_map *l;
    int n = 0, others = 0;
    uint64_t dev, ino;
    struct stat st;

    for (l = ag.head; l && n < MAX_CHAIN; l = l->l_next, n++) {
        int set = id_at(l, &dev, &ino);
        if (l->l_next && l->l_next->l_prev != l) {
            *why = "the loader's list is not doubly linked as expected";
            return 0;
        }
        if (l == ag.self)
            continue;
        if (l == ag.head || (ag.at_base && l->l_addr == ag.at_base) ||
            (ag.at_vdso && l->l_addr == ag.at_vdso)) {
            if (set) {
                *why = "the program, ld.so or the vdso holds a non-zero value at the calibrated offset";
                return 0;
            }
            continue;
        }
        if (!set || !l->l_name || !l->l_name[0] || stat_path(l->l_name, &st) != 0)
            continue;
        if ((uint64_t)st.st_dev != dev || (uint64_t)st.st_ino != ino) {
            *why = "another library's value at the calibrated offset is not its file's id";
            return 0;
        }
        if (dev == sdev && ino == sino) {
            *why = "another library claims the agent's own id";
            return 0;
        }
        others++;
    }
    if (AGENT_GLIBC && others < 1) {
        *why = "no other library confirms the calibrated offset";
        return 0;
    }
    return 1;
}

/* Where the loader keeps each object's program headers (glibc l_phdr and
 * l_phnum, musl phdr and phnum), calibrated the same way: for every object
 * of this namespace, dl_iterate_phdr reports dlpi_phdr/dlpi_phnum; one
 * offset (and one just after it) must hold exactly those in every map.  The
 * repair needs them for objects of other namespaces too, which glibc's
 * dl_iterate_phdr does not report (it shows the caller's namespace only). */
struct seen {
    uintptr_t addr;
    const char *name;
    const ElfW(Phdr) *phdr;
    uint16_t phnum;
};
#define MAX_SEEN 128
static struct seen seen[MAX_SEEN];
static struct link_map *seen_map[MAX_SEEN];
static int n_seen, seen_overflow;

static int seen_cb(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)size;
    (void)data;
    if (n_seen == MAX_SEEN) {
        seen_overflow = 1;
        return 1;
    }
    seen[n_seen].addr = info->dlpi_addr;
    seen[n_seen].name = info->dlpi_name;
    seen[n_seen].phdr = info->dlpi_phdr;
    seen[n_seen].phnum = info->dlpi_phnum;
    n_seen++;
    return 0;
}

static int calibrate_phdrs(const char **why)
{
    size_t p, q, found_p = 0, found_q = 0;
    int i, n, me = -1, hits_p = 0, hits_q = 0;
    struct link_map *l;

    n_seen = seen_overflow = 0;
    dl_iterate_phdr(seen_cb, NULL);
    if (seen_overflow || n_seen < 2) {
        *why = "dl_iterate_phdr reports too many or too few objects";
        return 0;
    }
    for (i = 0; i < n_seen; i++) {
        seen_map[i] = NULL;
        for (l = ag.head, n = 0; l && n < MAX_CHAIN; l = l->l_next, n++)
            if (l->l_addr == seen[i].addr && l->l_name == seen[i].name)
                seen_map[i] = l;
        if (!seen_map[i]) {
            *why = "dl_iterate_phdr reports an object that is not in the loader's list";
            return 0;
        }
        if (seen_map[i] == ag.self)
            me = i;
    }
    if (me < 0) {
        *why = "dl_iterate_phdr does not report the agent";
        return 0;
    }
    for (p = 5 * PTR; p + PTR <= ag.id_off; p += PTR) {
        for (i = 0; i < n_seen; i++)
            if (*(const ElfW(Phdr) *const *)((const char *)seen_map[i] + p) != seen[i].phdr)
                break;
        if (i == n_seen) {
            hits_p++;
            found_p = p;
        }
    }
    if (hits_p != 1) {
        *why = "the program headers' pointer is not at one offset in every map";
        return 0;
    }
    for (q = found_p + PTR; q <= found_p + 4 * PTR && q + 2 <= ag.id_off; q += 2) {
        for (i = 0; i < n_seen; i++)
            if (*(const uint16_t *)((const char *)seen_map[i] + q) != seen[i].phnum)
                break;
        if (i == n_seen) {
            hits_q++;
            found_q = q;
        }
    }
    if (hits_q != 1) {
        *why = "the program headers' count is not at one offset in every map";
        return 0;
    }
    ag.phdr_off = found_p;
    ag.phnum_off = found_q;
    return 1;
}

#if AGENT_GLIBC
/* glibc's private list of the names an object answers to (l_libname, +56 /
 * +28 in every release 2.17..master, reference T2): { name, next, ... }. */
struct libname {
    const char *name;
    const struct libname *next;
};
#define LIBNAME_OFF (7 * PTR)
#define MAX_LIBNAMES 64

/* Used by the hot path's name pre-check only; verified on the agent's own
 * map, whose names include the very path it was loaded by (l_name).  If this
 * does not hold, the pre-check is off: every dlopen() then stat()s. */
static void verify_libnames(void)
{
    const struct libname *ln = *(const struct libname *const *)((const char *)ag.self + LIBNAME_OFF);
    int k;

    for (k = 0; ln && k < MAX_LIBNAMES; ln = ln->next, k++)
        if (ln->name && strcmp(ln->name, ag.self->l_name) == 0) {
            ag.libname_off = LIBNAME_OFF;
            return;
        }
    say("name pre-check: ", "the agent's own names were not found at l_libname; every dlopen() will stat()");
}

/* 1 if the loader will find `file` among the names of namespace 0's objects:
 * then it returns that object without opening any file and never compares
 * ids, so no check is needed.  The loader compares the requested string
 * with each object's l_name and l_libname entries, under its load lock; we
 * do the same under the same lock, and only when it is free (trylock: this
 * check never waits) and not already held by this thread (a constructor or
 * destructor running inside dlopen/dlclose, where objects may be half
 * removed).  Any doubt answers 0, and the caller stat()s. */
/* The names found last (touched only under the load lock).  A hit is
 * re-validated on the live lists before it counts: the object is still in
 * namespace 0, the string is still one of its names, and it equals `file`;
 * so the cache can only save string comparisons, never answer wrongly. */
#define NAME_CACHE 8
static struct {
    const struct link_map *map;
    const char *name;
} name_cache[NAME_CACHE];
static unsigned name_cache_next;

static int is_name_of(const struct link_map *l, const char *name)
{
    const struct libname *ln = *(const struct libname *const *)((const char *)l + ag.libname_off);
    int k;

    if (l->l_name == name)
        return 1;
    for (k = 0; ln && k < MAX_LIBNAMES; ln = ln->next, k++)
        if (ln->name == name)
            return 1;
    return 0;
}

static int cached_name(const char *file)
{
    const struct link_map *l;
    int i, n;

    /* Only strings that are still names of a live object are ever read: an
     * entry's map must be in the list and its name one of that map's names
     * (pointer comparisons) before the string is compared. */
    for (l = ag.head, n = 0; l && n < MAX_CHAIN; l = l->l_next, n++)
        for (i = 0; i < NAME_CACHE; i++)
            if (name_cache[i].map == l && is_name_of(l, name_cache[i].name) &&
                strcmp(name_cache[i].name, file) == 0)
                return 1;
    return 0;
}

static int loader_knows(const char *file)
{
    const struct link_map *l;
    const struct libname *ln;
    const char *hit = NULL;
    int n, k, found = 0;

    if (!ag.load_lock || !ag.libname_off || pthread_mutex_trylock(ag.load_lock) != 0)
        return 0;
    if (ag.load_lock->__data.__count == 1) {
        found = cached_name(file);
        for (l = ag.head, n = 0; !found && l && n < MAX_CHAIN; l = l->l_next, n++) {
            if (l->l_name && strcmp(l->l_name, file) == 0)
                hit = l->l_name;
            ln = *(const struct libname *const *)((const char *)l + ag.libname_off);
            for (k = 0; !hit && ln && k < MAX_LIBNAMES; ln = ln->next, k++)
                if (ln->name && strcmp(ln->name, file) == 0)
                    hit = ln->name;
            if (hit) {
                found = 1;
                name_cache[name_cache_next % NAME_CACHE].map = l;
                name_cache[name_cache_next % NAME_CACHE].name = hit;
                name_cache_next++;
            }
        }
    }
    pthread_mutex_unlock(ag.load_lock);
    return found;
}
#endif

static int calibrate(void)
{
    struct stat st;
    Dl_info di;
    struct link_map *lm = NULL;
    const char *why = NULL;
    size_t off, hit = 0;
    int hits = 0, n, fd;

#if AGENT_GLIBC
    if (!dladdr1((void *)calibrate, &di, (void **)&lm, RTLD_DL_LINKMAP) || !lm)
        return inert("dladdr1 gave no link_map for the agent");
    for (ag.head = lm, n = 0; ag.head->l_prev && n < MAX_CHAIN; n++)
        ag.head = ag.head->l_prev;
#else
    /* musl: the program's DT_DEBUG points at the loader's debug record, whose
     * map list starts with the program; this library's dso is the one whose
     * name is the very string dladdr() reports. */
    if (!dladdr((void *)calibrate, &di) || !di.dli_fname)
        return inert("dladdr failed for the agent");
    {
        const ElfW(Phdr) *ph = (const ElfW(Phdr) *)getauxval(AT_PHDR);
        size_t i, phnum = getauxval(AT_PHNUM);
        uintptr_t bias = 0, dyn = 0;
        int have_bias = 0;
        struct r_debug *rd;
        struct link_map *l;
        for (i = 0; ph && i < phnum; i++)
            if (ph[i].p_type == PT_PHDR) {
                bias = (uintptr_t)ph - ph[i].p_vaddr;
                have_bias = 1;
            }
        for (i = 0; ph && have_bias && i < phnum; i++)
            if (ph[i].p_type == PT_DYNAMIC)
                dyn = bias + ph[i].p_vaddr;
        rd = dyn ? (struct r_debug *)dt_value((const ElfW(Dyn) *)dyn, DT_DEBUG) : NULL;
        if (!rd || !rd->r_map)
            return inert("the program has no DT_DEBUG record (static or unusual program)");
        ag.head = rd->r_map;
        for (l = ag.head, n = 0; l && n < MAX_CHAIN; l = l->l_next, n++)
            if (l->l_name == di.dli_fname)
                lm = l;
        if (!lm)
            return inert("the agent is not in the loader's list");
    }
#endif
    ag.self = lm;
    if (!lm->l_name || !lm->l_name[0])
        return inert("the agent's map has no file name");
    if (lm->l_name[0] == '/') {
        if (strlen(lm->l_name) >= sizeof ag.self_path)
            return inert("the agent's path is too long");
        strcpy(ag.self_path, lm->l_name);
    } else {
        size_t c;
        if (!getcwd(ag.self_path, sizeof ag.self_path))
            return inert("relative agent path and no working directory");
        c = strlen(ag.self_path);
        if (c + 1 + strlen(lm->l_name) >= sizeof ag.self_path)
            return inert("the agent's path is too long");
        ag.self_path[c] = '/';
        strcpy(ag.self_path + c + 1, lm->l_name);
    }
    /* The file at the agent's path now.  At load time it is the one the
     * loader opened: the scan below finds its id only if the two agree. */
    fd = open(ag.self_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return inert("cannot open the agent's own file");
    n = fstat(fd, &st);
    close(fd);
    if (n != 0 || !S_ISREG(st.st_mode))
        return inert("cannot fstat the agent's own file");
    for (off = 2 * PTR; off + 16 <= WINDOW; off += PTR) {
        if (load64((char *)lm + off) == (uint64_t)st.st_dev &&
            load64((char *)lm + off + 8) == (uint64_t)st.st_ino) {
            hits++;
            hit = off;
        }
    }
    if (hits == 0)
        return inert("the agent's own file id is not in its loader record (file replaced since load?)");
    if (hits > 1)
        return inert("the agent's own file id appears more than once in its loader record");
    ag.id_off = hit;
#if AGENT_GLIBC
    {
        /* l_scope_max (== 4 unless grown), l_scope, l_local_scope[0] pointing
         * back into the map (at l_searchlist), then the id: T2, every release. */
        const char *p = (const char *)lm;
        size_t scope_max = *(const size_t *)(p + hit - 4 * PTR);
        const char *scope = *(const char *const *)(p + hit - 3 * PTR);
        const char *local0 = *(const char *const *)(p + hit - 2 * PTR);
        if (real_of(lm) != lm || scope_max < 4 || scope_max > 1u << 20 || !scope ||
            local0 <= p || local0 >= p + hit)
            return inert("the members before the calibrated id do not have link_map's shape");
    }
#else
    {
        /* map and map_len come right before dev (T5) and must describe the
         * agent's own mapping, which dladdr reports as dli_fbase. */
        uintptr_t map = *(const uintptr_t *)((const char *)lm + hit - 2 * PTR);
        size_t len = *(const size_t *)((const char *)lm + hit - PTR);
        uintptr_t me = (uintptr_t)(void *)calibrate;
        if (map != (uintptr_t)di.dli_fbase || me < map || me >= map + len || lm->l_addr > map)
            return inert("the members before the calibrated id do not have struct dso's shape");
    }
#endif
    ag.at_base = getauxval(AT_BASE);
    ag.at_vdso = getauxval(AT_SYSINFO_EHDR);
    if (!cross_check((uint64_t)st.st_dev, (uint64_t)st.st_ino, &why) || !calibrate_phdrs(&why))
        return inert(why);
    ag.base_dev = (uint64_t)st.st_dev;
    ag.base_ino = (uint64_t)st.st_ino;
    ag.rdebug = (struct r_debug *)dt_value(ag.head->l_ld, DT_DEBUG);
    if (ag.rdebug && ag.rdebug->r_map != ag.head)
        ag.rdebug = NULL;  /* not the record of this list: walk namespace 0 only */
#if AGENT_GLIBC
    {
        const char *lock = getenv("LDFIX_AGENT_LOCK");
        if (lock && strcmp(lock, "write") == 0)
            say("load lock: ", "not used (LDFIX_AGENT_LOCK=write)");
        else
            find_load_lock();
    }
    verify_libnames();
#endif
    {
        struct msg m = {.n = 0};
        m_s(&m, AGENT_GLIBC ? "active: glibc" : "active: musl");
#if AGENT_GLIBC
        m_s(&m, " ");
        m_s(&m, gnu_get_libc_version());
#endif
        m_s(&m, ", id at +");
        m_u(&m, ag.id_off, 10);
        m_s(&m, ", phdr at +");
        m_u(&m, ag.phdr_off, 10);
        m_s(&m, "/+");
        m_u(&m, ag.phnum_off, 10);
        m_s(&m, ", agent ");
        m_s(&m, ag.self_path);
        m_s(&m, " ");
        m_id(&m, ag.base_dev, ag.base_ino);
#if AGENT_GLIBC
        m_s(&m, ag.load_lock ? ", load lock verified" : ", write lock only");
        m_s(&m, ag.load_lock && ag.libname_off ? ", name pre-check on" : ", name pre-check off");
#endif
        m_s(&m, ag.rdebug ? "" : ", namespace 0 only");
        set_status(&m);
        say(ag.status, "");
    }
    return 1;
}

static void atfork_child(void)
{
    /* A fork taken while another thread repaired must not inherit a held lock. */
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    memcpy(&agent_mutex, &fresh, sizeof fresh);
}

static void agent_init(void)
{
    const char *d = getenv("LDFIX_AGENT_DEBUG"), *off = getenv("LDFIX_AGENT_DISABLE");
    int ok;

    ag.debug = d && *d && strcmp(d, "0") != 0;
    ldfix_real_dlopen = (void *(*)(const char *, int))dlsym(RTLD_NEXT, "dlopen");
#if AGENT_GLIBC
    ldfix_real_dlmopen = (void *(*)(Lmid_t, const char *, int))dlsym(RTLD_NEXT, "dlmopen");
    if (!ldfix_real_dlmopen) {
        say("fatal: ", "no dlmopen to forward to");
        abort();
    }
#endif
    if (!ldfix_real_dlopen) {
        say("fatal: ", "no dlopen to forward to");
        abort();
    }
    if (off && *off && strcmp(off, "0") != 0)
        ok = inert("LDFIX_AGENT_DISABLE is set");
    else
        ok = calibrate();
    if (ok)
        pthread_atfork(NULL, NULL, atfork_child);
    __atomic_store_n(&ag.state, ok ? ST_ACTIVE : ST_INERT, __ATOMIC_RELEASE);
}

static void ensure_init(void)
{
    if (__atomic_load_n(&ag.state, __ATOMIC_ACQUIRE) == ST_UNINIT)
        pthread_once(&init_once, agent_init);
}

__attribute__((constructor)) static void agent_ctor(void)
{
    int saved = errno;
    ensure_init();
    errno = saved;
}

/* ------------------------------------------------------------- content */

/* Static buffers: used only under agent_mutex. */
static unsigned char file_head[sizeof(Ehdr) + MAX_PHNUM * sizeof(Phdr)];
static unsigned char note_buf[MAX_NOTE];

/* The GNU build-id in a note segment's bytes (4-byte padded notes); the
 * same bounds as ldfix's elf.build_id_from_notes. */
static const unsigned char *build_id_in(const unsigned char *p, size_t len, size_t *idlen)
{
    size_t pos = 0;

    while (pos + 12 <= len) {
        uint32_t namesz, descsz, type;
        size_t name_end, desc_end;
        memcpy(&namesz, p + pos, 4);
        memcpy(&descsz, p + pos + 4, 4);
        memcpy(&type, p + pos + 8, 4);
        if (namesz > 256 || descsz > 1024)
            return NULL;
        name_end = pos + 12 + ((namesz + 3) & ~3u);
        desc_end = name_end + ((descsz + 3) & ~3u);
        if (desc_end > len)
            return NULL;
        if (type == NT_GNU_BUILD_ID && namesz == 4 && memcmp(p + pos + 12, "GNU", 4) == 0) {
            *idlen = descsz;
            return descsz ? p + name_end : NULL;
        }
        pos = desc_end;
    }
    return NULL;
}

/* Is [addr, addr+len) inside one PT_LOAD's file-backed bytes of the image? */
static int in_image(const struct dl_phdr_info *info, uintptr_t addr, size_t len)
{
    int i;

    for (i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *p = &info->dlpi_phdr[i];
        uintptr_t lo = info->dlpi_addr + p->p_vaddr;
        if (p->p_type == PT_LOAD && addr >= lo && addr - lo <= p->p_filesz && len <= p->p_filesz - (addr - lo))
            return 1;
    }
    return 0;
}

static int pread_all(int fd, void *buf, size_t len, off_t off)
{
    size_t done = 0;

    while (done < len) {
        ssize_t r = pread(fd, (char *)buf + done, len - done, off + (off_t)done);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        done += (size_t)r;
    }
    return 0;
}

/* 1: the file holds what is mapped; 0: it does not (status `changed`). */
static int same_content(const struct dl_phdr_info *info, int fd, off_t size, const char **how)
{
    const Ehdr *fe = (const Ehdr *)file_head;
    const Phdr *fph = (const Phdr *)(file_head + sizeof(Ehdr));
    unsigned char fid[1024];
    const unsigned char *p;
    size_t fidlen = 0, iidlen = 0;
    const unsigned char *iid = NULL;
    int i, notes, file_ok = 0;

    /* The file: header, program headers, build-id. */
    if (size >= (off_t)sizeof(Ehdr) && pread_all(fd, file_head, sizeof(Ehdr), 0) == 0 &&
        memcmp(fe->e_ident, ELFMAG, SELFMAG) == 0 && fe->e_ident[EI_CLASS] == MY_CLASS &&
        fe->e_phentsize == sizeof(Phdr) && fe->e_phnum <= MAX_PHNUM &&
        (off_t)fe->e_phoff + (off_t)(fe->e_phnum * sizeof(Phdr)) <= size &&
        pread_all(fd, file_head + sizeof(Ehdr), fe->e_phnum * sizeof(Phdr), (off_t)fe->e_phoff) == 0)
        file_ok = 1;
    if (file_ok) {
        for (i = 0, notes = 0; i < fe->e_phnum && notes < MAX_NOTES && !fidlen; i++) {
            if (fph[i].p_type != PT_NOTE || fph[i].p_filesz > MAX_NOTE)
                continue;
            notes++;
            if ((off_t)fph[i].p_offset + (off_t)fph[i].p_filesz > size ||
                pread_all(fd, note_buf, fph[i].p_filesz, (off_t)fph[i].p_offset) != 0)
                continue;
            p = build_id_in(note_buf, fph[i].p_filesz, &fidlen);
            if (p)
                memcpy(fid, p, fidlen);
            else
                fidlen = 0;
        }
    }
    /* The image: build-id from its notes, as mapped. */
    for (i = 0, notes = 0; i < info->dlpi_phnum && notes < MAX_NOTES && !iid; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        uintptr_t at = info->dlpi_addr + ph->p_vaddr;
        if (ph->p_type != PT_NOTE || ph->p_filesz > MAX_NOTE)
            continue;
        notes++;
        if (in_image(info, at, ph->p_filesz))
            iid = build_id_in((const unsigned char *)at, ph->p_filesz, &iidlen);
    }
    if (iid && fidlen) {
        *how = iidlen == fidlen && memcmp(iid, fid, fidlen) == 0 ? "same build-id" : "build-id differs";
        return iidlen == fidlen && memcmp(iid, fid, fidlen) == 0;
    }
    if (iid || fidlen) {
        *how = "build-id present on one side only";
        return 0;
    }
    /* No build-id on either side.  Matching headers, even a matching first
     * page, do not show the rest of the file matches; only its mapped file
     * could, and a process cannot open its own map_files without
     * CAP_SYS_ADMIN.  Left alone (`ldfix fix`, as root, compares the bytes). */
    *how = "no build-id: the bytes cannot be compared from inside the process";
    return 0;
}

/* -------------------------------------------------------------- repair */

static struct link_map *maps[MAX_MAPS];
static int n_maps;

struct tally {
    int rewritten, ok, changed, missing, unset, other;
};

static void index_list(struct link_map *l)
{
    int n;

    for (n = 0; l && n < MAX_CHAIN && n_maps < MAX_MAPS; l = l->l_next, n++)
        maps[n_maps++] = l;
}

/* Every map of every namespace: namespace 0 from the program's map; the
 * others (glibc >= 2.35, r_version >= 2) along r_debug_extended.r_next,
 * which follows the five public r_debug members.  (dl_iterate_phdr cannot
 * serve here: glibc reports only the caller's namespace.) */
static void build_index(void)
{
    n_maps = 0;
    index_list(ag.head);
#if AGENT_GLIBC
    if (ag.rdebug && ag.rdebug->r_version >= 2) {
        const struct r_debug *rd = ag.rdebug;
        int ns;
        for (ns = 1; ns < MAX_NS; ns++) {
            rd = *(const struct r_debug *const *)((const char *)rd + sizeof(struct r_debug));
            if (!rd)
                break;
            index_list(rd->r_map);
        }
    }
#endif
}

static void report(const char *what, const char *name, uint64_t d0, uint64_t i0, uint64_t d1, uint64_t i1,
                   const char *how)
{
    struct msg m = {.n = 0};

    if (!ag.debug)
        return;
    m_s(&m, "ldfix-agent: ");
    m_s(&m, what);
    m_s(&m, " ");
    m_s(&m, name);
    m_s(&m, " ");
    m_id(&m, d0, i0);
    if (d1 || i1) {
        m_s(&m, " -> ");
        m_id(&m, d1, i1);
    }
    if (how) {
        m_s(&m, " (");
        m_s(&m, how);
        m_s(&m, ")");
    }
    m_say(&m);
}

static void image_of(const struct link_map *l, struct dl_phdr_info *info)
{
    memset(info, 0, sizeof *info);
    info->dlpi_addr = l->l_addr;
    info->dlpi_name = l->l_name;
    info->dlpi_phdr = *(const ElfW(Phdr) *const *)((const char *)l + ag.phdr_off);
    info->dlpi_phnum = *(const uint16_t *)((const char *)l + ag.phnum_off);
}

/* Judge one object as `ldfix fix` does, and write its id if it is stale. */
static void repair_one(struct link_map *l, struct tally *t)
{
    struct dl_phdr_info info;
    uint64_t dev, ino;
    struct stat st, st2;
    const char *how = NULL;
    int pfd, fd;

    if (!id_at(l, &dev, &ino)) {
        t->unset++;
        return;
    }
    /* Only ordinary libraries are ever written (as ldfix: role "library"). */
    if (l == ag.head || (ag.at_base && l->l_addr == ag.at_base) || (ag.at_vdso && l->l_addr == ag.at_vdso) ||
        (AGENT_GLIBC && real_of(l) != l) || !l->l_name || !l->l_name[0]) {
        t->other++;
        return;
    }
    image_of(l, &info);
    if (!info.dlpi_phdr || info.dlpi_phnum == 0 || info.dlpi_phnum > MAX_PHNUM) {
        t->other++;
        return;
    }
    pfd = open(l->l_name, O_PATH | O_CLOEXEC);
    if (pfd < 0) {
        t->missing++;
        report("missing", l->l_name, dev, ino, 0, 0, NULL);
        return;
    }
    if (fstat(pfd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(pfd);
        t->missing++;
        report("missing", l->l_name, dev, ino, 0, 0, "not a regular file");
        return;
    }
    close(pfd);
    if ((uint64_t)st.st_dev == dev && (uint64_t)st.st_ino == ino) {
        t->ok++;
        return;
    }
    fd = open(l->l_name, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0 || fstat(fd, &st2) != 0 || st2.st_dev != st.st_dev || st2.st_ino != st.st_ino) {
        if (fd >= 0)
            close(fd);
        t->missing++;
        report("missing", l->l_name, dev, ino, 0, 0, "the file changed while being looked at");
        return;
    }
    if (!same_content(&info, fd, st2.st_size, &how)) {
        close(fd);
        t->changed++;
        report("changed (not written)", l->l_name, dev, ino, (uint64_t)st.st_dev, (uint64_t)st.st_ino, how);
        return;
    }
    close(fd);
    store64((char *)l + ag.id_off, (uint64_t)st.st_dev);
    store64((char *)l + ag.id_off + 8, (uint64_t)st.st_ino);
    t->rewritten++;
    report("rewrote", l->l_name, dev, ino, (uint64_t)st.st_dev, (uint64_t)st.st_ino, how);
}

static void repair_all(struct tally *t)
{
    int i;

    build_index();
    for (i = 0; i < n_maps; i++)
        repair_one(maps[i], t);
}

#if AGENT_GLIBC
/* Runs with the loader's write lock held (see repair()); once. */
static int repair_cb(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)info;
    (void)size;
    repair_all(data);
    return 1;
}
#endif

/* Namespaces mid-change (r_state != RT_CONSISTENT): a load or unload is in
 * flight in another thread. */
static int loader_busy(void)
{
    const struct r_debug *rd = ag.rdebug;
    int ns;

    for (ns = 0; rd && ns < MAX_NS; ns++) {
        if (__atomic_load_n(&rd->r_state, __ATOMIC_ACQUIRE) != RT_CONSISTENT)
            return 1;
        if (!AGENT_GLIBC || rd->r_version < 2)
            break;
        rd = *(const struct r_debug *const *)((const char *)rd + sizeof(struct r_debug));
    }
    return 0;
}

/* Serialisation.
 *  - agent_mutex: one repair at a time; a dlopen() that detected the restore
 *    waits here until the repair is done, then re-checks and proceeds.
 *  - glibc, load lock verified (find_load_lock): taken first, before
 *    agent_mutex (a dlopen() made from a constructor holds it already and
 *    takes it again: recursive), so no load or unload anywhere in the process
 *    is in flight while ids are read and written.
 *  - glibc, always: the walk and the writes run inside dl_iterate_phdr's
 *    callback, which holds the loader's write lock: no object can enter or
 *    leave the lists, or be freed, meanwhile.  Without the load lock (not
 *    verified) we first wait, bounded, until every namespace's r_state is
 *    consistent, and a load racing with the writes can at worst miss the
 *    repaired id (a second copy, as without the agent), never see a false one.
 *  - musl: its loader lock is static and not exported; dlopen sets the debug
 *    record's state to RT_ADD for the whole load (and runs constructors only
 *    after resetting it), so we wait, bounded, for it to be consistent.
 *    dlclose never unmaps on musl: the list only grows.
 *  Cancellation is disabled throughout (open() is a cancellation point), and
 *  nothing here allocates memory. */
static int repair(int forced)
{
    struct tally t = {0};
    struct stat st;
    int cancel, result = 0, mine = 0;
    long waited = 0, step = 20000;

    pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &cancel);
    if (ag.load_lock)
        pthread_mutex_lock(ag.load_lock);
    pthread_mutex_lock(&agent_mutex);
    if (stat_path(ag.self_path, &st) == 0)
        mine = 1;
    if (!forced && mine && (uint64_t)st.st_dev == __atomic_load_n(&ag.base_dev, __ATOMIC_RELAXED) &&
        (uint64_t)st.st_ino == __atomic_load_n(&ag.base_ino, __ATOMIC_RELAXED))
        goto out;  /* another thread repaired meanwhile */
    if (!ag.load_lock) {
        while (loader_busy()) {
            struct timespec ts = {0, step};
            if (waited >= BUSY_WAIT_NS) {
                say("repair postponed: ", "the loader stayed busy (a load in flight in another thread)");
                result = -2;
                goto out;
            }
            nanosleep(&ts, NULL);
            waited += step;
            if (step < 5000000)
                step *= 2;
        }
    }
#if AGENT_GLIBC
    dl_iterate_phdr(repair_cb, &t);
#else
    repair_all(&t);
#endif
    result = t.rewritten;
    ag.repairs++;
    ag.rewritten_total += (unsigned long)t.rewritten;
    if (mine) {
        __atomic_store_n(&ag.base_dev, (uint64_t)st.st_dev, __ATOMIC_RELAXED);
        __atomic_store_n(&ag.base_ino, (uint64_t)st.st_ino, __ATOMIC_RELAXED);
    }
    if (ag.debug) {
        struct msg m = {.n = 0};
        m_s(&m, "ldfix-agent: ");
        m_s(&m, forced ? "ldfix_repair(): " : "restore detected: ");
        m_u(&m, (unsigned)t.rewritten, 10);
        m_s(&m, " rewritten, ");
        m_u(&m, (unsigned)t.ok, 10);
        m_s(&m, " ok, ");
        m_u(&m, (unsigned)t.changed, 10);
        m_s(&m, " changed, ");
        m_u(&m, (unsigned)t.missing, 10);
        m_s(&m, " missing, ");
        m_u(&m, (unsigned)t.unset, 10);
        m_s(&m, " unset, ");
        m_u(&m, (unsigned)t.other, 10);
        m_s(&m, " not libraries");
        m_say(&m);
    }
out:
    pthread_mutex_unlock(&agent_mutex);
    if (ag.load_lock)
        pthread_mutex_unlock(ag.load_lock);
    pthread_setcancelstate(cancel, NULL);
    return result;
}

/* The check: one stat() of the agent's own file. */
static void check(void)
{
    struct stat st;

    if (stat_path(ag.self_path, &st) == 0 &&
        ((uint64_t)st.st_ino != __atomic_load_n(&ag.base_ino, __ATOMIC_RELAXED) ||
         (uint64_t)st.st_dev != __atomic_load_n(&ag.base_dev, __ATOMIC_RELAXED)))
        repair(0);
}

/* dlmopen(): always checked (rare, and the target namespace may be any). */
HIDDEN void ldfix_agent_hook(void)
{
    int saved = errno;

    ensure_init();
    if (ag.state == ST_ACTIVE)
        check();
    errno = saved;
}

/* dlopen(file).  The hot path.  dlopen(NULL) opens no file.  On glibc, a
 * name the loader already knows (loader_knows: the common "dlopen again"
 * case) never reaches the id comparison, so it needs no check; this saves
 * the stat(), a system call that costs more than such a dlopen().  musl
 * matches by name only for names without '/', and compares ids for every
 * path: it is always checked. */
HIDDEN void ldfix_agent_hook_open(const char *file)
{
    int saved = errno;

    ensure_init();
    if (ag.state == ST_ACTIVE && file) {
#if AGENT_GLIBC
        if (!loader_knows(file))
#endif
            check();
    }
    errno = saved;
}

/* ----------------------------------------------------------------- API */

/* Repair now (for programs that know they were restored).  Returns the
 * number of ids rewritten (>= 0), -1 if the agent is inert (its layout could
 * not be verified: nothing is ever written), -2 if the loader stayed busy. */
API int ldfix_repair(void)
{
    int saved = errno, r;

    ensure_init();
    r = ag.state == ST_ACTIVE ? repair(1) : -1;
    errno = saved;
    return r;
}

/* One line: "active: ..." or "inert: why". */
API const char *ldfix_agent_status(void)
{
    ensure_init();
    return ag.status;
}

/* ------------------------------------------------------------- entries */

/* dlopen and dlmopen: call the hook, then jump (not call) to the real
 * function with the caller's arguments and return address untouched.
 * glibc's dlopen looks at its return address to find the calling object:
 * its namespace, its DT_RUNPATH/DT_RPATH and its $ORIGIN.  A C wrapper would
 * make the agent the caller. */
#if defined(__x86_64__)
#ifdef __CET__
#define ENDBR "endbr64\n"
#else
#define ENDBR ""
#endif
__asm__(
    ".text\n"
    ".globl dlopen\n"
    ".type dlopen,@function\n"
    ".p2align 4\n"
    "dlopen:\n"
    ".cfi_startproc\n"
    ENDBR
    "push %rdi\n"
    ".cfi_adjust_cfa_offset 8\n"
    "push %rsi\n"
    ".cfi_adjust_cfa_offset 8\n"
    "sub $8, %rsp\n"
    ".cfi_adjust_cfa_offset 8\n"
    "call ldfix_agent_hook_open\n"
    "add $8, %rsp\n"
    ".cfi_adjust_cfa_offset -8\n"
    "pop %rsi\n"
    ".cfi_adjust_cfa_offset -8\n"
    "pop %rdi\n"
    ".cfi_adjust_cfa_offset -8\n"
    "jmp *ldfix_real_dlopen(%rip)\n"
    ".cfi_endproc\n"
    ".size dlopen, .-dlopen\n"
#if AGENT_GLIBC
    ".globl dlmopen\n"
    ".type dlmopen,@function\n"
    ".p2align 4\n"
    "dlmopen:\n"
    ".cfi_startproc\n"
    ENDBR
    "push %rdi\n"
    ".cfi_adjust_cfa_offset 8\n"
    "push %rsi\n"
    ".cfi_adjust_cfa_offset 8\n"
    "push %rdx\n"
    ".cfi_adjust_cfa_offset 8\n"
    "call ldfix_agent_hook\n"
    "pop %rdx\n"
    ".cfi_adjust_cfa_offset -8\n"
    "pop %rsi\n"
    ".cfi_adjust_cfa_offset -8\n"
    "pop %rdi\n"
    ".cfi_adjust_cfa_offset -8\n"
    "jmp *ldfix_real_dlmopen(%rip)\n"
    ".cfi_endproc\n"
    ".size dlmopen, .-dlmopen\n"
#endif
);
#else
/* Other architectures: a C wrapper.  With -O2 compilers emit a sibling call
 * here (the frame is gone before the jump), which keeps the caller's return
 * address, but nothing guarantees it: see the README. */
API void *dlopen(const char *file, int mode)
{
    ldfix_agent_hook_open(file);
    return ldfix_real_dlopen(file, mode);
}
#if AGENT_GLIBC
API void *dlmopen(Lmid_t ns, const char *file, int mode)
{
    ldfix_agent_hook();
    return ldfix_real_dlmopen(ns, file, mode);
}
#endif
#endif
