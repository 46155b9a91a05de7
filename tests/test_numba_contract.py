"""The Numba backend's contract with the rule record, and its regression tests.

* the kernels read the rule record's scalar/flag vocabulary by name (no position
  of their own, no branch on a rule's name);
* a changed vocabulary never loads stale cached kernels;
* non-finite params come out as on the reference (``0 * inf`` is nan);
* Newton needs no scipy.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("numba")

import fastopt as fo  # noqa: E402
from _cases import CASE_IDS, CASES, make_problem, run  # noqa: E402
from fastopt import _rules  # noqa: E402
from fastopt._backend import available  # noqa: E402
from fastopt.kernels import numba_cpu as nc  # noqa: E402

CPU_BACKENDS = [b for b in ("numpy", "numba") if available(b)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ the rule record


def test_every_slot_constant_is_its_names_slot():
    consts = {k: v for k, v in vars(nc).items() if k.startswith("_S_")}
    names = {k[3:].lower() for k in consts}
    assert names == set(_rules.KERNEL_SCALARS)
    for k, v in consts.items():
        assert v == nc._HEAD + _rules.KERNEL_SCALAR_SLOT[k[3:].lower()], k
    assert nc._NSCALARS == nc._HEAD + len(_rules.KERNEL_SCALARS)


@pytest.mark.parametrize("rule,options", [c[:2] for c in CASES], ids=CASE_IDS)
def test_scalar_array_holds_each_value_at_its_name(rule, options):
    r = _rules.RULES[rule]
    hp = {**r.defaults, **_rules.PIPELINE_DEFAULTS, **options}
    s, _ = r.step_scalars(hp, 3, dict(r.group_state))
    head = [float(k + 1) for k in range(nc._HEAD)]
    cs = nc._scalars(np.dtype(np.float64), head, r.kernel_scalars(s))
    assert list(cs[:nc._HEAD]) == head
    for name in r.pack + ("l2", "decay"):
        assert cs[nc._slot(name)] == float(s[name]), name
    if r.kind in (_rules.ELEMENTWISE, _rules.TRUST_RATIO):  # the fused kinds have entry points
        assert (rule, nc._mode(r, s)) in nc._ENTRIES


def test_every_variant_of_every_fused_rule_has_an_entry_point():
    for r in _rules.RULES.values():
        if r.kind not in (_rules.ELEMENTWISE, _rules.TRUST_RATIO):  # Newton, Muon: host drivers
            continue
        for v in range(1 << len(r.variants)):
            assert (r.name, v) in nc._ENTRIES, (r.name, v)
            if "hessian_power" in r.pack:
                assert (r.name, v | nc._V_POW) in nc._ENTRIES, (r.name, v)


def test_no_branch_on_a_rule_name():
    src = inspect.getsource(nc)
    names = "|".join(map(re.escape, _rules.RULES))
    assert not re.search(rf"""[=!]=\s*["']({names})["']""", src)
    assert not re.search(r"_PACK\b", src)


# ------------------------------------------------------------------ cache fingerprint

_CACHE_PROBE = textwrap.dedent("""
    import sys
    import numpy as np
    from fastopt import _rules
    mode = sys.argv[1]
    def reorder_vocabulary():
        # the same names in reverse order: every slot moves
        _rules.KERNEL_SCALARS = _rules.KERNEL_SCALARS[::-1]
        _rules.KERNEL_SCALAR_SLOT = {n: k for k, n in enumerate(_rules.KERNEL_SCALARS)}
    if mode == "changed":
        reorder_vocabulary()  # before the backend reads it
    import fastopt as fo
    from fastopt.kernels import numba_cpu as nc
    if mode == "mismatch":
        reorder_vocabulary()  # after: the kernels read the old slots (a stale kernel would)
    assert nc.CACHE_ERROR is None, nc.CACHE_ERROR
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(100).astype(np.float32)
    g = rng.standard_normal(100).astype(np.float32)
    out = {}
    nc._FORCE = "parallel"  # 100 elements would take Adam's serial twin
    for be in ("numpy", "numba"):
        p = [p0.copy()]
        opt = fo.Adam(p, lr=0.1, weight_decay=0.1, backend=be)  # "raise": the check runs
        opt.step([g]); opt.step([g])
        out[be] = p[0]
    nc._FORCE = None
    ok = np.allclose(out["numba"], out["numpy"], rtol=1e-5, atol=1e-6)
    # both cache classes: Adam's parallel entry point, the read pass's serial twin (an
    # exact pass: 100 elements run as one part) and the fast check of the step (_k_check)
    nc.OPS._stats([g], 1.0, None)
    sts = [nc._k_adam.stats, nc._SERIAL[nc._k_read].stats, nc._k_check.stats]
    # kernels loaded without Numba's registry refresh (_FingerprintCache.load_overload):
    # a compile afterwards in the same process still works (it refreshes them itself)
    import numba
    ok = ok and numba.njit(lambda x: np.sqrt(x) + 1.0)(3.0) == np.sqrt(3.0) + 1.0
    print(nc.FINGERPRINT, sum(sum(st.cache_hits.values()) for st in sts),
          sum(sum(st.cache_misses.values()) for st in sts), ok)
""")


def _cache_probe(mode, cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), FASTOPT_NUMBA_CACHE="1")
    r = subprocess.run([sys.executable, "-c", _CACHE_PROBE, mode], env=env, capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    fp, hits, misses, ok = r.stdout.split()
    return fp, int(hits), int(misses), ok == "True"


def test_changed_vocabulary_does_not_load_stale_cached_kernels(tmp_path):
    fp0, hits, misses, ok = _cache_probe("same", tmp_path)
    assert (hits, misses, ok) == (0, 3, True)  # compiled and saved
    assert _cache_probe("same", tmp_path) == (fp0, 3, 0, True)  # the cache works: loaded
    fp1, hits, misses, ok = _cache_probe("changed", tmp_path)
    assert fp1 != fp0
    assert (hits, misses, ok) == (0, 3, True)  # recompiled with the new slots, right math
    # the control: kernels reading other slots than the host packed give wrong math,
    # which is what a stale cache hit would have given above
    assert _cache_probe("mismatch", tmp_path)[3] is False


_TWIN_PROBE = textwrap.dedent("""
    import sys
    import numpy as np
    import fastopt as fo
    from fastopt.kernels import numba_cpu as nc
    nc._FORCE = "serial"  # the serial twins, whose element loop is a closure per rule body
    ok = []
    for name in sys.argv[1].split(","):
        rng = np.random.default_rng(5)
        p, g = rng.standard_normal(37).astype(np.float32), rng.standard_normal(37).astype(np.float32)
        out = []
        for backend in ("numpy", "numba"):
            q = p.copy()
            opt = getattr(fo, name)([q], lr=0.1, backend=backend)
            for _ in range(3):
                opt.step([g])
            out.append(q)
        ok.append(bool(np.allclose(out[1], out[0], rtol=1e-5)))
    print(all(ok))
""")


def test_twins_compiled_apart_each_run_their_own_loop(tmp_path):
    """Each rule's serial loop gets a machine-code symbol of its own.

    The serial twins' element loops (``rule_loop``, one closure per rule body) have one
    qualified name and the same argument types, and Numba's symbol adds only a
    per-process counter: Adam's and NAdam's, each compiled in a fresh process (as two
    test workers or two users would), got the same symbol, and a process that loaded
    both from the cache ran the first one loaded for both.
    """
    import shutil

    def probe(names, cache):
        env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), FASTOPT_NUMBA_CACHE="1")
        r = subprocess.run([sys.executable, "-c", _TWIN_PROBE, names], env=env,
                           capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.split()[-1]

    assert probe("Adam", tmp_path / "a") == "True"
    assert probe("NAdam", tmp_path / "b") == "True"
    shutil.copytree(tmp_path / "b", tmp_path / "a", dirs_exist_ok=True)
    assert probe("Adam,NAdam", tmp_path / "a") == "True"  # both loaded from the cache


# ------------------------------------------------------------------ non-finite params

_ELEMENTWISE = [c for c in CASES if _rules.RULES[c[0]].kind == _rules.ELEMENTWISE]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("rule,options", [c[:2] for c in _ELEMENTWISE],
                         ids=[c[2] for c in _ELEMENTWISE])
def test_backends_agree_on_nonfinite_params(rule, options, dtype):
    params, grads, extras = make_problem(rule, (9,), dtype, steps=3)
    params[0][:3] = [np.inf, -np.inf, np.nan]
    out = {}
    with np.errstate(all="ignore"):
        for be in CPU_BACKENDS:
            out[be] = run(rule, options, params, grads, extras, be)
    want_p, want_sd = out["numpy"]
    for be in CPU_BACKENDS:
        got_p, got_sd = out[be]
        # inf stays inf, nan stays nan, where the reference keeps them
        np.testing.assert_array_equal(np.isnan(got_p[0]), np.isnan(want_p[0]), err_msg=be)
        np.testing.assert_array_equal(got_p[0][np.isinf(want_p[0])],
                                      want_p[0][np.isinf(want_p[0])], err_msg=be)
        np.testing.assert_allclose(got_p[0], want_p[0], rtol=1e-5, err_msg=be)
        for name, w in want_sd["state"][0].items():
            np.testing.assert_allclose(got_sd["state"][0][name], w, rtol=1e-5,
                                       err_msg=f"{be} {name}")


@pytest.mark.parametrize("cls", [fo.SGD, fo.Adam])
def test_inf_param_stays_inf_without_weight_decay(cls):
    # the defect: 0 * inf in an always-on L2 term made it nan
    p = [np.array([np.inf, -np.inf, 1.0], np.float32)]
    cls(p, lr=0.1, backend="numba").step([np.ones(3, np.float32)])
    assert p[0][0] == np.inf and p[0][1] == -np.inf and np.isfinite(p[0][2])


# ------------------------------------------------------------------ Newton without scipy


def test_newton_runs_without_scipy():
    code = textwrap.dedent("""
        import sys
        sys.modules["scipy"] = None  # import scipy raises ImportError
        import numpy as np
        import fastopt as fo
        rng = np.random.default_rng(0)
        p0 = [rng.standard_normal(n) for n in (1, 4)]
        a = [rng.standard_normal((n, n)) for n in (1, 4)]
        hs = [x @ x.T + np.eye(len(x)) for x in a]
        gs = [rng.standard_normal(n) for n in (1, 4)]
        out = {}
        for be in ("numpy", "numba"):
            ps = [p.copy() for p in p0]
            fo.Newton(ps, lr=0.5, clip_norm=1.0, backend=be).step(gs, hs)
            out[be] = ps
        for w, g in zip(out["numpy"], out["numba"]):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)
        assert "scipy" not in {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "ok"


# ------------------------------------------------------------------ read pass


def test_read_pass_does_not_depend_on_the_thread_count():
    rng = np.random.default_rng(7)
    sizes = [3, 100_000, 8191, 8193, 0, 70_000]
    arrays = [(rng.standard_normal(n) * 10 ** rng.uniform(-3, 3, n)).astype(np.float32)
              for n in sizes]
    arrays[3][5] = np.inf
    n = len(arrays)
    tab = nc._table([(nc._P, arrays), (nc._G, arrays)], n)
    args = (tab, nc._sizes(arrays, n), np.ones(n, np.float32),
            nc._scalars(np.dtype(np.float32), nc._plain_head(1.0, 0.5)))
    want = np.array([[np.dot(np.clip(a, -0.5, 0.5).astype(np.float64),
                             np.clip(a, -0.5, 0.5).astype(np.float64)),
                      0.0 if np.isfinite(a).all() else np.nan] for a in arrays]).reshape(n, 2)
    for exact in (1, 0):
        runs = [nc._k_read(*args, exact, nc.DATA_OFFSET, threads) for threads in (1, 2, 3, 8)]
        # the serial twin (the compiled form of a call that runs as one part)
        runs.append(nc._SERIAL[nc._k_read](*args, exact, nc.DATA_OFFSET, 1))
        if not exact:  # the fast form of a small step's first call: _k_check, one part
            runs.append(nc._check_sums(arrays, args[1], np.dtype(np.float32), 1.0))
        for r in runs[1:]:
            np.testing.assert_array_equal(r, runs[0])  # bit for bit
    exact_run = nc._k_read(*args, 1, nc.DATA_OFFSET, 2)
    np.testing.assert_allclose(exact_run, want, rtol=1e-12)


def test_adahessian_power_one_and_other_powers_match_the_reference():
    from _cases import assert_parity

    for power in (1.0, 0.5):
        assert_parity("adahessian", {"lr": 0.1, "hessian_power": power}, (7, 300), np.float32,
                      "numba")


# ------------------------------------------------------------------ warm-up and first use


def test_warmup_compiles_and_reports_progress(capsys):
    seen = []
    secs = nc.warmup(("float64",), ["sgd", "rmsprop"], True,
                     lambda d, t, lab: seen.append((d, t, lab)))
    assert secs >= 0
    assert [d for d, _, _ in seen] == list(range(len(seen)))
    assert seen[-1][2] == "done" and seen[-1][0] == seen[-1][1] == 2 + 4 + 2  # sgd, rmsprop variants, read pass, scale+clip
    labels = [lab for _, _, lab in seen]
    assert "rmsprop float64 has_momentum centered" in labels


def test_public_warmup_checks_its_arguments():
    with pytest.raises(ValueError, match="rules"):
        fo.warmup(["adamm"])
    with pytest.raises(ValueError, match="dtypes"):
        fo.warmup(["sgd"], ["int8"])
    assert fo.warmup("sgd", "float64", variants=False) >= 0


def test_cli_warmup_and_first_use_note(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), FASTOPT_NUMBA_CACHE="1")
    code = textwrap.dedent("""
        import numpy as np, fastopt as fo
        for cls in (fo.SGD, fo.Lion):
            p = [np.ones(10, np.float32)]
            cls(p, lr=0.1).step([np.ones(10, np.float32)])
    """)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("fastopt: compiling") == 1  # cold cache: said once, not per kernel
    r = subprocess.run([sys.executable, "-m", "fastopt", "warmup", "--rules", "sgd",
                        "--dtypes", "float32", "--no-variants"], env=env, capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "numba kernels ready" in r.stdout and "compiling [" in r.stderr
    r = subprocess.run([sys.executable, "-m", "fastopt", "warmup", "--rules", "nope"], env=env,
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 2 and "rules" in r.stderr


def test_host_read_data_pointers_match_ctypes(monkeypatch):
    # the small fast check reads the grads' data pointers on the host (_data_pointers):
    # views at an offset and a fresh array, through the PyArrayObject field and the fallback
    base = np.arange(40, dtype=np.float32)
    arrays = [base[3:17], base[17:], np.ones(5), base]
    want = [a.ctypes.data for a in arrays]
    assert nc._data_pointers(arrays, 4).tolist() == want
    monkeypatch.setattr(nc, "DATA_OFFSET", -1)
    assert nc._data_pointers(arrays, 4).tolist() == want
    # and the check itself through them: sums of the view, not of its base
    sums = nc._check_sums(arrays[:1], nc._sizes(arrays[:1], 1), np.dtype(np.float32), 1.0)
    assert sums[0, 0] == float(np.dot(base[3:17].astype(np.float64), base[3:17]))
