"""``python -m fastopt``: the command line (info, and the commands other modules add)."""

from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    import numpy as np

    import fastopt
    from ._optim import OPTIMIZERS

    print(f"fastopt {fastopt.__version__}  (numpy {np.__version__}, python {sys.version.split()[0]})")
    print()
    print(f"{'backend':8}  {'available':9}  detail")
    info = fastopt.backends()
    for name, b in info.items():
        detail = f"{len(b['rules'])} rules" if b["available"] else b["reason"]
        print(f"{name:8}  {'yes' if b['available'] else 'no':9}  {detail}")
    print()
    names = list(info)
    print(f"{'rule':11} {'class':11} " + " ".join(f"{n:6}" for n in names))
    for rule, cls in OPTIMIZERS.items():
        marks = " ".join(f"{('yes' if rule in info[n]['rules'] else '-'):6}" for n in names)
        print(f"{rule:11} {cls.__name__:11} {marks}")
    return 0


COMMANDS = {"info": (_info, "list the backends (and why one is unavailable) and the rules")}


def _add_optional_commands(sub):
    """Commands whose modules may be absent in a partial checkout register themselves here."""
    for mod_name in ("fastopt._demo", "fastopt._bench"):
        try:
            mod = __import__(mod_name, fromlist=["register"])
        except ImportError:
            continue
        mod.register(sub)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastopt", description="fastopt command line")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.set_defaults(func=fn)
    _add_optional_commands(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
