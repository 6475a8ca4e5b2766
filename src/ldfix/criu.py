"""The CRIU restore hook: `ldfix-criu-hook` (csrc/criu_hook.c) execs
`ldfix criu-hook` at the acting stage only; this module does the work there.

Stage (see README, "CRIU restore hook"): `post-restore` by default.  There
every restored task exists with its final memory and sleeps inside CRIU's
restorer, so no user code can run and ldfix must not attach (CRIU seizes the
tasks right after); a failing script aborts the restore, which strict mode
needs.  `pre-resume` is supported too: every thread is then ptrace-stopped
by CRIU itself, which ldfix sees and relies on (a failure there is only
logged by CRIU).

Configuration: environment first, then the config file
(LDFIX_CRIU_CONFIG, default /etc/ldfix/criu-hook.conf, `key = value`):
  LDFIX_CRIU_STAGE  / stage   post-restore | pre-resume
  LDFIX_CRIU_MODE   / mode    lenient (default) | strict
  LDFIX_CRIU_REPORT / report  path of a JSON report written after each restore"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Any, NamedTuple, TextIO

from ldfix.errors import LdfixError

DEFAULT_CONFIG = "/etc/ldfix/criu-hook.conf"
STAGES = ("post-restore", "pre-resume")
MODES = ("lenient", "strict")


class HookConfig(NamedTuple):
    stage: str = "post-restore"
    mode: str = "lenient"
    report: str | None = None


class ConfigError(LdfixError):
    pass


def _read_config_file(path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if "=" in line:
                    k, v = (x.strip() for x in line.split("=", 1))
                    out[k] = v
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return out


def load_config(env: Mapping[str, str]) -> HookConfig:
    path = env.get("LDFIX_CRIU_CONFIG") or DEFAULT_CONFIG
    f = _read_config_file(path)
    stage = env.get("LDFIX_CRIU_STAGE") or f.get("stage") or "post-restore"
    mode = env.get("LDFIX_CRIU_MODE") or f.get("mode") or "lenient"
    report = env.get("LDFIX_CRIU_REPORT") or f.get("report") or None
    if stage not in STAGES:
        raise ConfigError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    return HookConfig(stage, mode, report)


def run_hook(env: Mapping[str, str] | None = None, err: TextIO | None = None) -> int:
    """One run of the hook.  Returns the exit status CRIU will see."""
    from ldfix.repair import FixReport, fix
    from ldfix.report import fix_json
    from ldfix.tree import address_spaces, descendants

    env = os.environ if env is None else env
    err = sys.stderr if err is None else err

    def say(msg: str) -> None:
        print(f"ldfix-criu-hook: {msg}", file=err, flush=True)

    action = env.get("CRTOOLS_SCRIPT_ACTION", "")
    try:
        cfg = load_config(env)
    except ConfigError as exc:
        say(f"configuration error: {exc}")
        return 1
    if action != cfg.stage:
        return 0
    strict = cfg.mode == "strict"
    t0 = time.monotonic()
    init = env.get("CRTOOLS_INIT_PID", "")
    if not init.isdigit():
        say(f"{action}: CRTOOLS_INIT_PID is not set: nothing to repair")
        return 1 if strict else 0
    pids, covered = address_spaces(descendants(int(init)))
    stopped_by = "criu (post-restore: tasks inside CRIU's restorer)" if action == "post-restore" else None
    reports: list[FixReport] = []
    for pid in pids:
        try:
            rep = fix(pid, stopped_by=stopped_by)
        except LdfixError as exc:
            rep = FixReport(pid=pid, error=str(exc), exit_code=exc.exit_code)
        except Exception as exc:  # noqa: BLE001 - lenient mode must never fail the restore
            rep = FixReport(pid=pid, error=f"pid {pid}: internal error: {type(exc).__name__}: {exc}",
                            exit_code=70)
        reports.append(rep)
        if rep.error:
            say(f"{action}: pid {pid}: FAILED: {rep.error}")
        else:
            say(f"{action}: pid {pid}: {rep.loader.kind if rep.loader else '?'} "
                f"{rep.loader.version if rep.loader else ''}: rewrote {len(rep.rewritten)} id(s)"
                + (f" ({', '.join(sorted({s.status.value for s in rep.skipped if s.status.value in ('changed', 'missing')}))} left alone)"
                   if any(s.status.value in ("changed", "missing") for s in rep.skipped) else ""))
    failed = [r for r in reports if r.error]
    elapsed = time.monotonic() - t0
    say(f"{action}: {len(reports)} process(es), {sum(len(r.rewritten) for r in reports)} id(s) rewritten, "
        f"{len(failed)} failed, {elapsed * 1000:.0f} ms ({cfg.mode})")
    status = 1 if (strict and failed) else 0
    if cfg.report:
        doc: dict[str, Any] = {"stage": action, "init_pid": int(init), "mode": cfg.mode,
                               "processes": [fix_json(r) for r in reports],
                               "covered": {str(k): v for k, v in covered.items()},
                               "failed": len(failed), "elapsed_ms": round(elapsed * 1000, 1),
                               "exit_code": status}
        import json  # only when a report is wanted: ~3 ms of start-up

        try:
            tmp = f"{cfg.report}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=1)
            os.replace(tmp, cfg.report)
        except OSError as exc:
            say(f"cannot write the report {cfg.report}: {exc.strerror}")
            if strict:
                status = 1
    return status
