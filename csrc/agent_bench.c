/* agent_bench: the cost of dlopen() of an already-loaded library, for
 * bench/agent_bench.py (run with and without LD_PRELOAD of the agent).
 *
 *   agent_bench LIB ALIAS FRESHDIR CALLS FRESH ROUNDS
 *
 * LIB is dlopen()ed once; then, per round, CALLS timed dlopen() calls of LIB
 * (the loader finds it by name), CALLS of ALIAS (a symlink to LIB: found by
 * id at its first use, then by name, as the loader adds it to the object's
 * names) and FRESH first uses of fresh symlinks FRESHDIR/R_I.so (each one
 * opened by the loader and found by comparing file ids), each followed by
 * an untimed dlclose() of the extra reference.  Prints one line per round:
 *   round NS_BY_NAME NS_BY_ALIAS NS_BY_FRESH_SYMLINK */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static double timed(const char *path, void *want, int calls, void **keep)
{
    double t0 = now_ns(), t1;
    int i;

    for (i = 0; i < calls; i++) {
        keep[i] = dlopen(path, RTLD_NOW);
        if (keep[i] != want) {
            fprintf(stderr, "agent_bench: dlopen(%s) gave %p, not %p: %s\n", path, keep[i], want,
                    keep[i] ? "a second copy" : dlerror());
            exit(1);
        }
    }
    t1 = now_ns();
    for (i = 0; i < calls; i++)
        dlclose(keep[i]);
    return (t1 - t0) / calls;
}

static double timed_fresh(const char *dir, int round, void *want, int calls, void **keep)
{
    char path[4096];
    double total = 0, t0;
    int i;

    for (i = 0; i < calls; i++) {
        snprintf(path, sizeof path, "%s/%d_%d.so", dir, round, i);
        t0 = now_ns();
        keep[i] = dlopen(path, RTLD_NOW);
        total += now_ns() - t0;
        if (keep[i] != want) {
            fprintf(stderr, "agent_bench: dlopen(%s) gave %p, not %p: %s\n", path, keep[i], want,
                    keep[i] ? "a second copy" : dlerror());
            exit(1);
        }
    }
    for (i = 0; i < calls; i++)
        dlclose(keep[i]);
    return total / calls;
}

int main(int argc, char **argv)
{
    int calls, fresh, rounds, r;
    void *h, **keep;

    if (argc != 7) {
        fprintf(stderr, "usage: agent_bench LIB ALIAS FRESHDIR CALLS FRESH ROUNDS\n");
        return 2;
    }
    calls = atoi(argv[4]);
    fresh = atoi(argv[5]);
    rounds = atoi(argv[6]);
    keep = calloc((size_t)(calls > fresh ? calls : fresh), sizeof *keep);
    h = dlopen(argv[1], RTLD_NOW);
    if (!h || !keep) {
        fprintf(stderr, "agent_bench: %s\n", dlerror());
        return 1;
    }
    for (r = 0; r < rounds; r++) {
        double by_name = timed(argv[1], h, calls, keep);
        double by_alias = timed(argv[2], h, calls, keep);
        double by_fresh = timed_fresh(argv[3], r, h, fresh, keep);
        printf("round %.1f %.1f %.1f\n", by_name, by_alias, by_fresh);
    }
    return 0;
}
