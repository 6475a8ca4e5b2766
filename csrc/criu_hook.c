/* ldfix-criu-hook: CRIU's --action-script entry point.
 *
 * CRIU executes the action script at every stage of a dump and a restore,
 * with no arguments and the stage in CRTOOLS_SCRIPT_ACTION.  This program
 * decides, without starting Python, whether the stage is the one ldfix acts
 * at (LDFIX_CRIU_STAGE, else `stage = ...` in the config file, else
 * post-restore); every other stage exits 0 at once.  At the acting stage it
 * execs `ldfix criu-hook` from the same directory (the package's console
 * script, or `ldfix` on PATH), which repairs every restored process. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define DEFAULT_STAGE "post-restore"
#define DEFAULT_CONFIG "/etc/ldfix/criu-hook.conf"

/* The value of `key` in a "key = value" file, into buf; 0 if absent. */
static int config_value(const char *path, const char *key, char *buf, size_t len)
{
    FILE *f = fopen(path, "re");
    char line[512];
    int found = 0;

    if (!f)
        return 0;
    while (fgets(line, sizeof line, f)) {
        char *p = line, *eq, *end;
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p == '#' || strncmp(p, key, strlen(key)) != 0)
            continue;
        eq = p + strlen(key);
        while (*eq == ' ' || *eq == '\t')
            eq++;
        if (*eq != '=')
            continue;
        eq++;
        while (*eq == ' ' || *eq == '\t')
            eq++;
        end = eq + strcspn(eq, " \t\r\n#");
        *end = 0;
        snprintf(buf, len, "%s", eq);
        found = 1;
    }
    fclose(f);
    return found;
}

int main(void)
{
    const char *action = getenv("CRTOOLS_SCRIPT_ACTION");
    const char *stage = getenv("LDFIX_CRIU_STAGE");
    const char *config = getenv("LDFIX_CRIU_CONFIG");
    char buf[64], self[PATH_MAX], target[PATH_MAX + 16];
    ssize_t n;
    char *slash;

    if (!action)
        return 0;
    if (!stage || !*stage) {
        stage = DEFAULT_STAGE;
        if (config_value(config && *config ? config : DEFAULT_CONFIG, "stage", buf, sizeof buf))
            stage = buf;
    }
    if (strcmp(stage, "post-restore") != 0 && strcmp(stage, "pre-resume") != 0) {
        /* A misspelt stage must not make the hook silently do nothing: let
         * `ldfix criu-hook` report the configuration error at post-restore,
         * where a failing script stops the restore. */
        if (strcmp(action, "post-restore") != 0)
            return 0;
    } else if (strcmp(action, stage) != 0) {
        return 0;
    }

    n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) {
        fprintf(stderr, "ldfix-criu-hook: cannot find itself: %s\n", strerror(errno));
        return 1;
    }
    self[n] = 0;
    slash = strrchr(self, '/');
    if (!slash)
        return 1;
    *slash = 0;
    snprintf(target, sizeof target, "%s/ldfix", self);
    execl(target, "ldfix", "criu-hook", (char *)NULL);
    /* Copied away from the package's bin directory: try PATH. */
    execlp("ldfix", "ldfix", "criu-hook", (char *)NULL);
    fprintf(stderr, "ldfix-criu-hook: cannot run %s or ldfix on PATH: %s\n", target, strerror(errno));
    return 1;
}
