"""``fastopt.warmup``: compile the numba backend's kernels ahead of the first step."""

from __future__ import annotations

import sys
import time


def warmup(rules=None, dtypes=("float32", "float64"), *, variants=True, progress=False,
           q8=False) -> float:
    """Compile (or load from the on-disk cache) the numba kernels; returns the seconds taken.

    ``rules``: rule names (``"adam"``, ...; default every rule); ``dtypes``: the
    param dtypes to compile for (``"float16"``/``"bfloat16"``: the 16-bit kernels,
    which also serve every state dtype and master weights); ``variants``: also amsgrad, momentum and
    centered; ``progress``: draw a progress line on stderr; ``q8``: also the
    8-bit-state (``state_dtype="q8"``) kernels of those dtypes.  The first step of
    a rule otherwise compiles its kernels on the spot (seconds, once per
    install: they are cached on disk).  Run it once before starting many
    worker processes that share one cold cache.
    """
    import numpy as np

    from ._backend import get_ops
    from ._rules import RULES

    rules = list(RULES) if rules is None else [rules] if isinstance(rules, str) else list(rules)
    for r in rules:
        if r not in RULES:
            raise ValueError(f"rules: expected names among {sorted(RULES)}, got {r!r}")
    dtypes = [dtypes] if isinstance(dtypes, str) else list(dtypes)
    names = []
    for d in dtypes:
        # 16-bit names are checked by name: asking for bfloat16 must not need ml_dtypes here
        name = d if isinstance(d, str) and d in _SIXTEEN else None
        if name is None:
            try:
                name = np.dtype(d).name
            except TypeError:
                pass
        if name not in ("float32", "float64") + _SIXTEEN:
            raise ValueError(f"dtypes: expected among 'float32', 'float64', 'float16', 'bfloat16', "
                             f"got {d!r}")
        names.append(name)
    get_ops("numba")  # a clear RuntimeError when numba is unavailable
    from .kernels import numba_cpu

    secs = numba_cpu.warmup(names, rules, variants, _bar if progress else None)
    if q8:
        secs += numba_cpu.q8_warmup(names, rules, variants, _bar if progress else None)
    return secs


#: 16-bit param dtypes: one tiled kernel per rule variant serves both (and every state dtype)
_SIXTEEN = ("float16", "bfloat16")


_T0 = [0.0]


def _bar(done, total, label):
    if done == 0:
        _T0[0] = time.perf_counter()
    width = 24
    fill = width * done // max(total, 1)
    line = (f"\rcompiling [{'#' * fill}{'.' * (width - fill)}] {done}/{total} "
            f"{time.perf_counter() - _T0[0]:5.1f}s  {label:32.32}")
    sys.stderr.write(line + ("\n" if done == total else ""))
    sys.stderr.flush()


def _cmd(args) -> int:
    dt = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    rules = None if args.rules in (None, "all") else [r.strip() for r in args.rules.split(",")]
    try:
        secs = warmup(rules, dt, variants=not args.no_variants,
                      progress=not args.no_progress, q8=args.q8)
    except (ValueError, RuntimeError) as e:
        print(f"python -m fastopt warmup: {e}", file=sys.stderr)
        return 2
    print(f"numba kernels ready in {secs:.1f} s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("warmup", help="compile the numba kernels now (cached on disk)")
    p.add_argument("--rules", default="all", help="comma-separated rule names (default: all)")
    p.add_argument("--dtypes", default="float32,float64", help="comma-separated dtypes")
    p.add_argument("--no-variants", action="store_true",
                   help="only the plain kernel of each rule (no amsgrad/momentum/centered)")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.add_argument("--q8", action="store_true", help="also the 8-bit-state (q8) kernels")
    p.set_defaults(func=_cmd)
