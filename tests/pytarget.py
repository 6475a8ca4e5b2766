"""A CPython target speaking ldfix-target's protocol, loading libraries with ctypes.

  openx HEX   ctypes.CDLL(path) -> "ok handle=.. state=.. ctors=N lmid=0"
  selffix     ldfix.fix(os.getpid()) -> "ok rewritten=N"
"""

import ctypes
import os
import sys

keep = []


def main() -> None:
    print(f"ready {os.getpid()}", flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "openx":
            path = bytes.fromhex(arg).decode()
            try:
                lib = ctypes.CDLL(path)
            except OSError as exc:
                print(f"err {exc}", flush=True)
                continue
            keep.append(lib)
            state = ctypes.addressof(ctypes.c_int.in_dll(lib, "ldfix_demo_state"))
            print(f"ok handle={lib._handle:#x} state={state:#x} ctors={lib.ldfix_demo_loads()} lmid=0",
                  flush=True)
        elif cmd == "selffix":
            import ldfix
            rep = ldfix.fix(os.getpid())
            print(f"ok rewritten={len(rep.rewritten)} freeze={rep.freeze!r}", flush=True)
        elif cmd == "exit":
            print("ok", flush=True)
            return
        else:
            print("err unknown command", flush=True)


main()
