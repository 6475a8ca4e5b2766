"""Rendering: the readable table and the JSON documents.

Names come from untrusted memory: every byte that is not printable ASCII is
shown escaped (\\xNN, \\n, ...), so a name cannot move the cursor, clear the
screen or forge a line."""

from __future__ import annotations

import re
from typing import Any

from ldfix.model import FileId, Inspection, LoadedObject


_PLAIN = re.compile(rb"[\x20-\x5b\x5d-\x7e]*")


def escape(raw: bytes) -> str:
    if _PLAIN.fullmatch(raw):
        return raw.decode("ascii")
    out = []
    for b in raw:
        if b == 0x5C:
            out.append("\\\\")
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        elif b == 0x0A:
            out.append("\\n")
        elif b == 0x09:
            out.append("\\t")
        else:
            out.append(f"\\x{b:02x}")
    return "".join(out)


def _id(fid: FileId | None) -> str:
    return "-" if fid is None else str(fid)


def object_json(o: LoadedObject) -> dict[str, Any]:
    return {
        "namespace": o.namespace,
        "name": escape(o.name),
        "role": o.role,
        "base": o.base,
        "address": o.address,
        "stored": o.stored.as_json() if o.stored else None,
        "current": o.current.as_json() if o.current else None,
        "status": o.status.value,
        "reason": o.reason,
    }


def loader_json(ins: Inspection) -> dict[str, Any]:
    li = ins.loader
    return {"kind": li.kind, "version": li.version, "arch": li.arch,
            "layout_source": li.layout_source, "layout_error": li.layout_error,
            "interpreter": li.interpreter}


def inspection_json(ins: Inspection) -> dict[str, Any]:
    return {
        "pid": ins.pid,
        "loader": loader_json(ins),
        "objects": [object_json(o) for o in ins.objects],
        "counts": ins.counts(),
        "partial": ins.partial,
        "warnings": ins.warnings,
    }


def inspection_table(ins: Inspection) -> str:
    li = ins.loader
    lines = [f"pid {ins.pid}: {li.kind} {li.version or '(version unknown)'} {li.arch}, "
             f"layout: {li.layout_source or 'NOT VERIFIED'}"]
    if li.layout_error:
        lines.append(f"  ids unknown: {li.layout_error}")
    for ns in ins.namespaces():
        lines.append(f"namespace {ns}:")
        lines.append(f"  {'base':>14}  {'stored':<22} {'current':<22} {'status':<8} name")
        for o in ins.objects:
            if o.namespace != ns:
                continue
            lines.append(f"  {o.base:#14x}  {_id(o.stored):<22} {_id(o.current):<22} "
                         f"{o.status.value:<8} {escape(o.name)}")
    counts = ", ".join(f"{v} {k}" for k, v in ins.counts().items())
    lines.append(f"{len(ins.objects)} objects: {counts}")
    if ins.partial:
        lines.append("PARTIAL: the loader's lists could not be walked to the end")
    for w in ins.warnings:
        lines.append(f"warning: {escape(w.encode())}")
    return "\n".join(lines)


def fix_json(rep: Any) -> dict[str, Any]:
    """One process of `ldfix fix --json` (rep: repair.FixReport)."""
    def rw(r: Any) -> dict[str, Any]:
        return {"name": escape(r.name), "namespace": r.namespace, "address": r.address,
                "old": r.old.as_json(), "new": r.new.as_json()}
    li = rep.loader
    return {
        "pid": rep.pid,
        "loader": None if li is None else {"kind": li.kind, "version": li.version, "arch": li.arch,
                                           "layout_source": li.layout_source},
        "dry_run": rep.dry_run,
        "planned": [rw(r) for r in rep.planned] if rep.dry_run else None,
        "rewritten": [rw(r) for r in rep.rewritten],
        "skipped": [{"name": escape(s.name), "namespace": s.namespace, "status": s.status.value,
                     "reason": s.reason} for s in rep.skipped],
        "pause_us": rep.pause_us,
        "freeze": rep.freeze,
        "attempts": rep.attempts,
        "error": rep.error,
        "exit_code": rep.exit_code,
    }


def fix_text(rep: Any) -> str:
    if rep.error:
        # Errors name their pid already.
        return rep.error if rep.error.startswith(f"pid {rep.pid}") else f"pid {rep.pid}: {rep.error}"
    rows = rep.planned if rep.dry_run else rep.rewritten
    verb = "would rewrite" if rep.dry_run else "rewrote"
    head = f"pid {rep.pid}: {verb} {len(rows)} id(s)"
    if not rep.dry_run and rows:
        head += f" (threads held {rep.pause_us} us, {rep.freeze})"
    lines = [head]
    for r in rows:
        lines.append(f"  0x{r.address:x}  {r.old} -> {r.new}  [ns {r.namespace}] {escape(r.name)}")
    notable = [s for s in rep.skipped if s.status.value not in ("ok", "unset", "virtual")]
    for s in notable:
        lines.append(f"  skipped {s.status.value:<8} {escape(s.name)}: {s.reason}")
    quiet = len(rep.skipped) - len(notable)
    if quiet:
        lines.append(f"  ({quiet} other objects ok, unset or virtual)")
    return "\n".join(lines)
