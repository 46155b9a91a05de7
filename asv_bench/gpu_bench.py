"""GPU benchmarks of the ``cupy`` backend, timed with CUDA events (for a GPU session).

    python asv_bench/gpu_bench.py OUTDIR [--quick]

Writes ``OUTDIR/gpu_bench.json`` (every figure) and ``OUTDIR/gpu_bench.txt`` (a summary).
Needs CuPy and a device; torch with CUDA is optional (its rows are left out without it).

1. ``copy``: ``dst[...] = src`` on 2**28 float32 -- the bandwidth roofline (bytes read+written).
2. ``adam_2^28``: one float32 tensor of 2**28 elements, fastopt Adam (``nonfinite="ignore"``:
   no host sync; ``"raise"``: one flag read per step) against ``torch.optim.Adam(fused=True)``
   and ``foreach=True``; effective bandwidth at Adam's bytes per element (28 in float32, from
   ``fastopt.apps.benchkit``) and its fraction of ``copy``.
3. ``multi_tensor``: 200 float32 tensors of log-uniform sizes (1e3 .. 4e6 elements), Adam,
   fastopt against torch fused.
4. ``launches_per_step``: kernel launches fastopt makes per step, for each case.
5. ``rules_2^24``: every element-wise rule on one 2**24 float32 tensor: ms per step and GB/s
   (bytes per element from the rule table, ``fastopt.apps.benchkit.bytes_per_element``).
6. ``formats_2^24``: Adam on one 2**24 tensor in each storage format -- float32; bfloat16
   params with state "param", float32 state, bfloat16 state + stochastic rounding; q8 state
   with float32 and with bfloat16 (+SR) params; torch fused Adam on the same bfloat16 params --
   measured in interleaved rounds in one process, reported as ratios to fastopt float32 Adam.
   A format the installed fastopt cannot build (say q8 before its API lands) is listed with
   the reason instead of a time.

Times are the median of ``reps`` steps after ``warmup`` steps, each bracketed by CUDA events
on the library's current stream and synchronized on the end event (``benchkit.measure`` with
``benchkit.cuda_events``, the timing loop every fastopt benchmark shares).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np

from fastopt.apps.benchkit import (ELEMENTWISE_RULES, Progress, bytes_per_element, cuda_events,
                                   measure)


#: Options of section 5 beyond a rule's defaults: SGD with a momentum buffer, as it is trained.
RULE_OPTIONS = {"sgd": {"momentum": 0.9}}


def _median_ms(fn, lib, warmup, reps):
    """Median milliseconds of ``fn`` over exactly ``reps`` runs after ``warmup``, by CUDA events."""
    sync = lib.cuda.Device().synchronize if lib.__name__ == "cupy" else lib.cuda.synchronize
    return 1e3 * measure(fn, sync, min_time=0.0, min_runs=reps, max_runs=reps, max_time=float("inf"),
                         warmup=warmup, timer=cuda_events(lib))


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _gbs(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9


def _fastopt_adam(cupy, sizes, nonfinite, seed=0):
    import fastopt as fo

    rng = cupy.random.default_rng(seed)
    ps = [rng.standard_normal(n, dtype=cupy.float32) for n in sizes]
    gs = [rng.standard_normal(n, dtype=cupy.float32) for n in sizes]
    opt = fo.Adam(ps, lr=1e-3, nonfinite=nonfinite, backend="cupy")
    return opt, (lambda: opt.step(gs))


def _torch_adam(torch, sizes, **kw):
    ps = [torch.randn(n, device="cuda", requires_grad=True) for n in sizes]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(ps, lr=1e-3, **kw)
    return opt.step


#: section 6: (name, param dtype name, Adam options); bytes per element = read p, g and each
#: state, write p and each state (+ the absmax of q8: 4 bytes per 256 elements per state)
FORMATS = (
    ("f32", "float32", {}),
    ("bf16_state_param", "bfloat16", {"state_dtype": "param"}),
    ("bf16_state_f32", "bfloat16", {}),
    ("bf16_state_bf16_sr", "bfloat16", {"state_dtype": "bfloat16", "stochastic_rounding": True}),
    ("f32_q8", "float32", {"state_dtype": "q8"}),
    ("bf16_q8_sr", "bfloat16", {"state_dtype": "q8", "stochastic_rounding": True}),
)


def format_bytes(param_itemsize: int, state: str, n_states: int = 2) -> float:
    """Bytes per element of one Adam step in a storage format (see FORMATS)."""
    per_state = {"float32": 8, "bfloat16": 4, "q8": 2 + 8 / 256}[state]
    return 3 * param_itemsize + n_states * per_state


def _formats(cupy, torch, res, lines, warmup, reps, n=2**24, rounds=3):
    import ml_dtypes

    import fastopt as fo

    bf16 = np.dtype(ml_dtypes.bfloat16)
    r = cupy.random.default_rng(2)
    p32 = r.standard_normal(n, dtype=cupy.float32)
    g32 = r.standard_normal(n, dtype=cupy.float32)
    steps, out = {}, {}
    for name, dtype, kw in FORMATS:
        try:
            if dtype == "bfloat16":  # bits of the nearest bfloat16, as a CuPy bfloat16 array
                p = cupy.asarray(p32.get().astype(bf16).view(np.uint16)).view(bf16)
                g = cupy.asarray(g32.get().astype(bf16).view(np.uint16)).view(bf16)
            else:
                p, g = p32.copy(), g32
            opt = fo.Adam([p], lr=1e-3, nonfinite="ignore", backend="cupy", **kw)
            opt.step([g])
            steps[name] = (lambda o=opt, g=g: o.step([g]))
        except Exception as e:  # reported, not hidden: the row says why it has no time
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    if torch is not None:
        tp = torch.randn(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        tp.grad = torch.randn_like(tp)
        steps["torch_fused_bf16"] = torch.optim.Adam([tp], lr=1e-3, fused=True).step
    times = {k: [] for k in steps}
    for _ in range(rounds):  # interleaved: every format once per round
        for k, fn in steps.items():
            lib = torch if k.startswith("torch") else cupy
            times[k].append(_median_ms(fn, lib, warmup, reps))
    base = float(np.median(times["f32"])) if "f32" in times else None
    for name, dtype, kw in FORMATS + (("torch_fused_bf16", "bfloat16", {"state_dtype": "param"}),):
        if name not in times:
            continue
        ms = float(np.median(times[name]))
        state = kw.get("state_dtype", "float32")
        state = dtype if state == "param" else state
        nbytes = format_bytes(2 if dtype == "bfloat16" else 4, state)
        out[name] = {"ms": ms, "bytes_per_element": nbytes, "GB/s": _gbs(nbytes * n, ms),
                     "vs_fastopt_f32": None if base is None else ms / base}
    res["formats_2^24"] = out
    for name, v in out.items():
        if "error" in v:
            lines.append(f"adam {name:20s} not run: {v['error']}")
        else:
            lines.append(f"adam {name:20s} {v['ms']:8.3f} ms  {v['bytes_per_element']:5.2f} B/elem  "
                         f"{v['GB/s']:7.1f} GB/s  {v['vs_fastopt_f32']:.2f}x fastopt f32")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--quick", action="store_true", help="2**24 instead of 2**28, fewer reps")
    args = ap.parse_args(argv)
    os.makedirs(args.outdir, exist_ok=True)

    import cupy

    from fastopt import _backend
    from fastopt._rules import RULES
    from fastopt.kernels import cupy_gpu

    torch = _torch_cuda()
    adam_b = bytes_per_element("adam", itemsize=4)
    big = 2**24 if args.quick else 2**28
    warmup, reps = (2, 5) if args.quick else (5, 20)
    res = {"device": cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())["name"]
           .decode(), "cupy": cupy.__version__, "python": platform.python_version(),
           "torch": None if torch is None else torch.__version__, "n_big": big,
           "chunk_size": cupy_gpu.DEVICE.chunk_size, "block": cupy_gpu.DEVICE.block,
           "warmup": warmup, "reps": reps}
    lines = [f"device {res['device']}, cupy {res['cupy']}, torch {res['torch']}, n = 2**{big.bit_length() - 1}"]

    # 1. copy roofline
    src = cupy.ones(big, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    ms = _median_ms(lambda: dst.__setitem__(Ellipsis, src), cupy, warmup, reps)
    res["copy"] = {"ms": ms, "GB/s": _gbs(8 * big, ms)}
    lines.append(f"copy            {ms:8.3f} ms  {res['copy']['GB/s']:7.1f} GB/s")
    del src, dst

    # 2. Adam on one big tensor
    res["adam_big"] = {}
    launches = {}
    for nonfinite in ("ignore", "raise"):
        opt, step = _fastopt_adam(cupy, [big], nonfinite)
        ms = _median_ms(step, cupy, warmup, reps)
        before = cupy_gpu.KERNELS.launches
        step()
        launches[f"adam_big_{nonfinite}"] = cupy_gpu.KERNELS.launches - before
        res["adam_big"][f"fastopt_{nonfinite}"] = {"ms": ms, "GB/s": _gbs(adam_b * big, ms),
                                                   "of_copy": _gbs(adam_b * big, ms) / res["copy"]["GB/s"]}
        del opt, step
        cupy.get_default_memory_pool().free_all_blocks()
    if torch is not None:
        for name, kw in (("torch_fused", {"fused": True}), ("torch_foreach", {"foreach": True})):
            step = _torch_adam(torch, [big], **kw)
            ms = _median_ms(step, torch, warmup, reps)
            res["adam_big"][name] = {"ms": ms, "GB/s": _gbs(adam_b * big, ms),
                                     "of_copy": _gbs(adam_b * big, ms) / res["copy"]["GB/s"]}
            del step
            torch.cuda.empty_cache()
    for k, v in res["adam_big"].items():
        lines.append(f"adam {k:15s} {v['ms']:8.3f} ms  {v['GB/s']:7.1f} GB/s  {v['of_copy']:.2f} of copy")

    # 3. many tensors
    rng = np.random.default_rng(0)
    sizes = [int(x) for x in np.exp(rng.uniform(np.log(1e3), np.log(4e6), 200))]
    total = sum(sizes)
    res["multi_tensor"] = {"n_tensors": len(sizes), "elements": total}
    opt, step = _fastopt_adam(cupy, sizes, "ignore")
    ms = _median_ms(step, cupy, warmup, reps)
    before = cupy_gpu.KERNELS.launches
    step()
    launches["multi_tensor_ignore"] = cupy_gpu.KERNELS.launches - before
    res["multi_tensor"]["fastopt"] = {"ms": ms, "GB/s": _gbs(adam_b * total, ms)}
    del opt, step
    if torch is not None:
        step = _torch_adam(torch, sizes, fused=True)
        ms = _median_ms(step, torch, warmup, reps)
        res["multi_tensor"]["torch_fused"] = {"ms": ms, "GB/s": _gbs(adam_b * total, ms)}
        del step
    for k in ("fastopt", "torch_fused"):
        if k in res["multi_tensor"]:
            v = res["multi_tensor"][k]
            lines.append(f"multi {k:14s} {v['ms']:8.3f} ms  {v['GB/s']:7.1f} GB/s  ({len(sizes)} tensors)")

    # 5. every element-wise rule on 2**24 (bytes per element from the rule table)
    n = 2**24
    res["rules_2^24"] = {}
    import fastopt as fo

    bar = Progress(len(ELEMENTWISE_RULES), unit="rule")
    for rule in ELEMENTWISE_RULES:
        bar.update(rule)
        r = cupy.random.default_rng(1)
        p = r.standard_normal(n, dtype=cupy.float32)
        g = r.standard_normal(n, dtype=cupy.float32)
        kw = RULE_OPTIONS.get(rule, {})
        opt = getattr(fo, RULES[rule].class_name)([p], nonfinite="ignore", backend="cupy", **kw)
        # a per-element extra input (AdaHessian's Hessian diagonal), shaped like the param
        extra = [r.standard_normal(n, dtype=cupy.float32)] if RULES[rule].extra else None
        step = (lambda o=opt, e=extra: o.step([g], e)) if extra else (lambda o=opt: o.step([g]))
        ms = _median_ms(step, cupy, warmup, reps)
        before = cupy_gpu.KERNELS.launches
        step()
        launches[f"{rule}_2^24"] = cupy_gpu.KERNELS.launches - before
        nbytes = n * bytes_per_element(rule, kw, 4)
        res["rules_2^24"][rule] = {"ms": ms, "GB/s": _gbs(nbytes, ms)}
        lines.append(f"{rule:15s} {ms:8.3f} ms  {_gbs(nbytes, ms):7.1f} GB/s")
        del opt, step, p, g
    bar.close()
    _formats(cupy, torch, res, lines, warmup, reps)
    res["launches_per_step"] = launches
    lines.append("launches per step: " + ", ".join(f"{k} {v}" for k, v in launches.items()))
    assert _backend.available("cupy")

    with open(os.path.join(args.outdir, "gpu_bench.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(args.outdir, "gpu_bench.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
