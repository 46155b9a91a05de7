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
        detail = (f"{len(b['rules'])} rules; param dtypes {', '.join(b['dtypes'])}"
                  f"{'; 8-bit state' if b.get('q8_state') else ''}"
                  if b["available"] else b["reason"])
        print(f"{name:8}  {'yes' if b['available'] else 'no':9}  {detail}")
    print()
    names = list(info)
    print(f"{'rule':11} {'class':11} " + " ".join(f"{n:6}" for n in names))
    for rule, cls in OPTIMIZERS.items():
        marks = " ".join(f"{('yes' if rule in info[n]['rules'] else '-'):6}" for n in names)
        print(f"{rule:11} {cls.__name__:11} {marks}")
    from . import layers

    print()
    print(f"{'layers':8}  {'available':9}  detail (BatchNorm, Dropout)")
    for name, b in layers.backends().items():
        detail = (f"input dtypes {', '.join(b['dtypes'])}; 16-bit "
                  f"{'in the kernels' if b['fused_16bit'] else 'through a float32 copy'}"
                  if b["available"] else b["reason"])
        print(f"{name:8}  {'yes' if b['available'] else 'no':9}  {detail}")
    return 0


COMMANDS = {"info": (_info, "list the backends (and why one is unavailable) and the rules")}


#: The application modules (``fastopt.apps``) that add a subcommand through ``register(sub)``.
APP_MODULES = ("fastopt.apps.demo", "fastopt.apps.bench")


def _add_app_commands(sub):
    """Register the apps' subcommands.

    An app module's optional *dependencies* (scikit-learn, matplotlib, torch) are
    imported inside its commands, never at module level, so importing the module
    itself must work: an ImportError here is a bug in fastopt and is raised, not
    hidden by a missing subcommand.
    """
    import importlib

    for mod_name in APP_MODULES:
        importlib.import_module(mod_name).register(sub)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastopt", description="fastopt command line")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.set_defaults(func=fn)
    _add_app_commands(sub)
    from ._warmup import register as register_warmup

    register_warmup(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
