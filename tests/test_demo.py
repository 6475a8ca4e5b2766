"""`ldfix demo` is tested documentation: it must tell the whole story and exit 0."""

from __future__ import annotations

from helpers import ldfix


def test_demo_tells_the_story() -> None:
    r = ldfix("demo", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "stale" in out
    assert "a SECOND copy was loaded (the bug)" in out
    assert "rewrote 1 id(s)" in out
    assert "the SAME handle: no second copy (repaired)" in out
    assert out.rstrip().endswith("The story holds.")
