"""``python -m fastopt bench`` and the asv suite (asv_bench/benchmarks): fast checks only.

The asv modules are imported here and each benchmark class's ``setup`` runs
for one small parameter set, so a broken benchmark fails in the test run, not
first on the dashboard.  ``.ci/asv_check.sh`` runs asv itself (``asv check``
and one quick benchmark).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

import numpy as np
import pytest

from fastopt import _backend
from fastopt.apps import bench as _bench
from fastopt.apps import benchkit as kit
from fastopt._cli import main
from fastopt._rules import DENSE_SOLVE, FACTORED, ORTHOGONALIZE, RULES

from _cases import CASES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_NUMBA = _backend.available("numba")
HAS_TORCH = _bench.torch_module() is not None


def bench_json(capsys, *args):
    assert main(["bench", "--json", "--no-progress", "--min-time", "0.001", *args]) == 0
    return json.loads(capsys.readouterr().out)


# --------------------------------------------------------------------------- the table of bytes


def test_arrays_per_element_follows_the_rule_table():
    assert set(kit.BYTES_TABLE) == set(RULES)
    assert kit.arrays_per_element("sgd") == 3                       # p, g -> p
    assert kit.arrays_per_element("adam") == 7                      # p, g, m, v -> p, m, v
    assert kit.arrays_per_element("adam", {"amsgrad": True}) == 9   # + max_exp_avg_sq
    assert kit.arrays_per_element("sgd", {"momentum": 0.9}) == 5    # + momentum_buffer
    assert kit.arrays_per_element("adahessian") == 8                # + the Hessian diagonal
    assert kit.arrays_per_element("lamb") == 10                     # two passes
    assert kit.arrays_per_element("newton") is None
    assert len(kit.GPT2_SMALL) == 148
    assert sum(int(np.prod(s)) for s in kit.GPT2_SMALL) == 124_439_808
    assert kit.GPT2_SMALL_SIZES == [int(np.prod(s)) for s in kit.GPT2_SMALL]


@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_bytes_per_element_is_the_rule_records(itemsize):
    """One bytes table: the benchmarks' figure is the rule record's, for every option set."""
    for rule, opts, _ in CASES:
        r = RULES[rule]
        # Newton's dense solve and Muon's matrix products are not bandwidth-bound: no figure
        want = (None if r.kind in (DENSE_SOLVE, ORTHOGONALIZE, FACTORED)
                else r.bytes_per_element({**r.defaults, **opts}, itemsize))
        assert kit.bytes_per_element(rule, opts, itemsize) == want, rule
        per = kit.arrays_per_element(rule, opts)
        assert want == (None if per is None else per * itemsize), rule
    assert kit.bytes_per_element("adam", itemsize=4) == 28  # the figure gpu_bench used to hard-code
    case = _bench.Case("numpy", "rmsprop", [(10,), (3, 4)], "float64", {"centered": True})
    assert case.bytes_per_step == 22 * 7 * 8  # p read+write, g, (square_avg, grad_avg) read+write


def test_one_timing_loop_counts_runs():
    calls = []
    t = kit.measure(lambda: calls.append(1), min_time=0.0, min_runs=4, max_runs=4,
                    max_time=float("inf"), warmup=2)
    assert len(calls) == 6 and t >= 0
    ticks = iter(range(100))
    fake = lambda fn: (fn(), next(ticks))[1]  # noqa: E731  a timer whose runs take 0, 1, 2, ...
    assert kit.measure(lambda: None, min_runs=5, max_runs=5, max_time=float("inf"), timer=fake) == 2
    a, b, r = kit.pairwise(lambda: None, lambda: None, 4, timer=lambda fn: (fn(), 2.0)[1])
    assert (a, b, r) == (2.0, 2.0, 1.0)


def test_cuda_event_timer_reads_milliseconds_between_its_events():
    """gpu_bench's timer, on stand-ins for CuPy's and torch's event APIs (no GPU here)."""
    import types

    log = []

    class Event:
        def __init__(self, **kw):
            self.t = None

        def record(self):
            self.t = len(log)
            log.append("record")

        def synchronize(self):
            log.append("sync")

        def elapsed_time(self, end):  # torch: start.elapsed_time(end), in ms
            return 1000.0 * (end.t - self.t)

    cuda = types.SimpleNamespace(Event=Event, get_elapsed_time=lambda a, b: a.elapsed_time(b))
    for name in ("cupy", "torch"):
        log.clear()
        once = kit.cuda_events(types.SimpleNamespace(__name__=name, cuda=cuda))
        assert once(lambda: log.append("fn")) == 2.0  # record, fn, record: 2 "ms" * 1000 = 2 s
        assert log == ["record", "fn", "record", "sync"]


# --------------------------------------------------------------------------- the peers compute the same step


@pytest.mark.parametrize("rule", _bench.NAIVE_RULES)
def test_naive_numpy_peer_is_the_same_update(rule):
    ref = _bench.make_case("numpy", rule, [(257,), (3, 5)], "float64", warm=False)
    naive = _bench.make_case("naive-numpy", rule, [(257,), (3, 5)], "float64", warm=False)
    for _ in range(3):
        ref.step()
        naive.step()
    for a, b in zip(ref.params, naive.params):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("impl", ["torch-fused", "torch-foreach"])
def test_torch_peer_is_the_same_update(impl):
    # a torch case takes its first step while being built (fused=True fails there, if at all)
    ref = _bench.make_case("numpy", "adam", [(257,)], "float64", warm=False)
    peer = _bench.make_case(impl, "adam", [(257,)], "float64", warm=False)
    for _ in range(3):
        ref.step()
    peer.step()
    peer.step()
    np.testing.assert_allclose(peer.params[0], ref.params[0], rtol=1e-10, atol=1e-12)


def test_unavailable_combinations_skip_the_asv_way():
    with pytest.raises(NotImplementedError, match="no naive NumPy"):
        _bench.Case("naive-numpy", "lion", [(10,)])
    if not _backend.available("cupy"):
        with pytest.raises(NotImplementedError, match="cupy"):
            _bench.Case("cupy", "adam", [(10,)])
    if HAS_TORCH:
        with pytest.raises(NotImplementedError, match="torch.optim has no lion"):
            _bench.Case("torch-foreach", "lion", [(10,)])


# --------------------------------------------------------------------------- the CLI


def test_bench_json_rows_are_consistent(capsys):
    out = bench_json(capsys, "--rules", "sgd,adam", "--backends", "numpy", "--sizes", "1000,5e3",
                     "--no-torch")
    assert out["dtype"] == "float32" and out["peers"] == [] and out["skipped"] == []
    assert {(r["rule"], r["size"]) for r in out["rows"]} == {
        ("sgd", 1000), ("adam", 1000), ("sgd", 5000), ("adam", 5000)}
    for r in out["rows"]:
        assert r["impl"] == "numpy" and r["time_s"] > 0
        nbytes = kit.BYTES_TABLE[r["rule"]] * r["size"] * 4
        assert r["gbps"] == pytest.approx(nbytes / r["time_s"] / 1e9)
        assert r["fraction_of_add"] == pytest.approx(r["gbps"] / out["add_gbps"][str(r["size"])])
        assert r["speedup_vs_numpy"] == pytest.approx(1.0)
        assert r["speedup_vs_torch"] is None


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
def test_bench_numba_rows_have_a_speedup_over_numpy(capsys):
    out = bench_json(capsys, "--rules", "sgd", "--backends", "numpy,numba", "--sizes", "2000",
                     "--no-torch")
    rows = {r["impl"]: r for r in out["rows"]}
    assert set(rows) == {"numpy", "numba"}
    want = rows["numpy"]["time_s"] / rows["numba"]["time_s"]
    assert rows["numba"]["speedup_vs_numpy"] == pytest.approx(want)


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_bench_table_with_torch(capsys):
    assert main(["bench", "--rules", "adam,lion", "--backends", "numpy", "--sizes", "1000",
                 "--min-time", "0.001", "--no-progress"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert "a += b: 1e3" in lines[2]
    assert lines[3].split()[:8] == ["rule", "backend", "size", "time", "GB/s", "of", "a+=b", "vs"]
    adam = next(ln for ln in lines if ln.startswith("adam"))
    lion = next(ln for ln in lines if ln.startswith("lion"))
    # Adam has a torch peer (the faster of fused and foreach); Lion has none
    assert adam.split()[-1] in ("fused", "foreach") and adam.split()[-2].endswith("x")
    assert lion.split()[-1] == "-"


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="no matplotlib")
def test_bench_plot_writes_a_png(tmp_path, capsys):
    path = tmp_path / "bench.png"
    assert main(["bench", "--rules", "sgd,adam", "--backends", "numpy", "--sizes", "1000,3000",
                 "--min-time", "0.001", "--no-torch", "--no-progress", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000


def test_bench_rejects_bad_options(capsys):
    with pytest.raises(SystemExit, match="--rules"):
        main(["bench", "--rules", "adam,nosuchrule", "--no-progress"])
    with pytest.raises(SystemExit, match="--sizes"):
        main(["bench", "--sizes", "big", "--no-progress"])


def test_text_progress_bar_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    bar = kit.Progress(2, enabled=True)
    bar.update("one")
    bar.update("two")
    bar.close()
    err = capsys.readouterr().err
    assert "[###############...............] 1/2 one" in err and "2/2 two" in err


# --------------------------------------------------------------------------- the asv suite


@pytest.fixture(scope="module")
def asv_suite():
    sys.path.insert(0, os.path.join(ROOT, "asv_bench"))
    try:
        mods = {name: importlib.import_module(f"benchmarks.{name}")
                for name in ("bench_step", "bench_multitensor", "bench_clip", "bench_bandwidth",
                             "bench_memory", "bench_compile", "bench_speed")}
        yield mods
    finally:
        sys.path.remove(os.path.join(ROOT, "asv_bench"))


def _params_ok(cls):
    assert len(cls.params) == len(cls.param_names)
    return True


def test_asv_params_come_from_the_rule_table(asv_suite):
    step = asv_suite["bench_step"].Step
    assert _params_ok(step)
    # every rule of one or two fused passes; Newton (a dense solve) and Muon (matrix
    # products) have classes of their own
    assert set(step.params[0]) == set(RULES) - {"newton", "muon", "adafactor"}
    assert asv_suite["bench_step"].Muon.params[0] == ["numpy", "numba", "torch"]
    assert step.params[1] == list(_backend.BACKEND_NAMES)
    assert step.params[3] == [1_000, 1_000_000, 16_000_000]
    for mod in asv_suite.values():
        for obj in vars(mod).values():
            if isinstance(obj, type) and hasattr(obj, "params"):
                _params_ok(obj)


def test_asv_time_benchmarks_set_up_and_step(asv_suite):
    m = asv_suite
    runs = [
        (m["bench_step"].Step(), ("adam", "numpy", "float32", 1000)),
        (m["bench_step"].Peers(), ("adam", "naive-numpy", 1000)),
        (m["bench_step"].Newton(), ("numpy", "float64", 16)),
        (m["bench_multitensor"].MultiTensor(), ("sgd", "numpy", "1000x256")),
        (m["bench_clip"].Pipeline(), ("numpy", "clip_global_norm", 4000)),
        (m["bench_clip"].ClipGradNorm(), ("numpy", 4000)),
    ]
    if HAS_NUMBA:
        runs.append((m["bench_step"].Step(), ("lion", "numba", "float64", 1000)))
    if HAS_TORCH:
        runs.append((m["bench_step"].Peers(), ("sgd", "torch-fused", 1000)))
    for bench, params in runs:
        bench.setup(*params)
        before = [np.copy(p) for p in getattr(getattr(bench, "case", None), "params", [])]
        for name in dir(bench):
            if name.startswith("time_"):
                getattr(bench, name)(*params)
        for b, p in zip(before, getattr(getattr(bench, "case", None), "params", [])):
            assert not np.array_equal(b, p), f"{type(bench).__name__}{params} did not step"


def test_asv_skips_what_cannot_run(asv_suite):
    with pytest.raises(NotImplementedError, match="no naive NumPy lion"):
        asv_suite["bench_bandwidth"].Bandwidth().setup("lion", "naive-numpy")
    if not _backend.available("cupy"):
        with pytest.raises(NotImplementedError, match="cupy"):
            asv_suite["bench_step"].Step().setup("adam", "cupy", "float32", 1000)


def test_asv_track_and_memory_benchmarks(asv_suite, monkeypatch):
    bw, mem = asv_suite["bench_bandwidth"], asv_suite["bench_memory"]
    monkeypatch.setattr(bw, "BIG", 20_000)
    monkeypatch.setattr(mem, "BIG", 20_000)
    b = bw.Bandwidth()
    b.setup("adam", "numpy")
    assert b.track_gbps("adam", "numpy") > 0
    assert 0 < b.track_fraction_of_add("adam", "numpy") < 20
    m = mem.Memory()
    m.setup("sgd", "numpy")
    m.peakmem_step("sgd", "numpy")
    t = mem.TemporaryMemory()
    t.setup("adam", "numpy")
    # the reference allocates temporaries the size of the params (processed grad, m/denom, ...)
    assert t.track_temporary_bytes("adam", "numpy") >= 1.0
    if HAS_NUMBA:
        t.setup("adam", "numba")
        assert t.track_temporary_bytes("adam", "numba") < 0.1  # fused and in place


def test_asv_numba_compile_benchmark_skips_or_sets_up(asv_suite):
    bench = asv_suite["bench_compile"].NumbaCompile()
    if HAS_NUMBA:
        bench.setup("float32")  # the compile itself runs minutes: asv only
    else:
        with pytest.raises(NotImplementedError):
            bench.setup("float32")


def test_muon_row_runs_interleaved_against_torch(capsys):
    """``bench --muon N --muon-only``: one interleaved fastopt/torch.optim.Muon row (a small N
    here; the figure of record is N = 4096)."""
    import json

    from fastopt.apps import bench as _b

    m = _b.muon_vs_torch(24, rounds=2, backend="numpy")
    assert m["shape"] == [24, 24] and m["fastopt_s"] > 0
    if _b.torch_module() is not None:
        assert m["torch_s"] > 0 and m["ratio"] == pytest.approx(m["fastopt_s"] / m["torch_s"])
    assert "muon numpy 24x24 float32" in _b.format_muon(m)
    from fastopt._cli import main

    assert m["torch_mode"] == "interleaved"
    assert main(["bench", "--muon", "16", "--muon-only", "--muon-rounds", "1", "--backends",
                 "numpy", "--json", "--no-progress", "--muon-limit", "0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["muon"]["shape"] == [16, 16] and "rows" not in out
    assert out["muon"]["torch_mode"] == "interleaved"
    with pytest.raises(SystemExit, match="--muon-limit: expected 0 .interleaved. or a positive"):
        main(["bench", "--muon", "16", "--muon-only", "--muon-limit", "-1", "--no-progress"])


def test_muon_bounded_mode_measures_torch_when_it_finishes():
    """The bounded mode (``bench --muon N --muon-limit F``): torch's step in a child process
    with a time limit.  A tiny N under a generous limit finishes: a measured ratio."""
    from fastopt.apps import bench as _b

    if _b.torch_module() is None or not hasattr(_b.torch_module().optim, "Muon"):
        pytest.skip("torch.optim.Muon is not available")
    m = _b.muon_vs_torch(8, rounds=1, backend="numpy", torch_limit_s=120.0)
    assert m["torch_mode"] == "bounded" and m["torch_limit_s"] == 120.0
    assert m["torch_finished"] is True and m["ratio_kind"] == "measured"
    assert m["torch_s"] > 0 and m["ratio"] == pytest.approx(m["fastopt_s"] / m["torch_s"])
    assert m["ratio_upper_bound"] is None
    assert "in a child process within its" in _b.format_muon(m)
    with pytest.raises(ValueError, match="torch_limit: expected a positive factor"):
        _b.muon_vs_torch(8, rounds=1, backend="numpy", torch_limit=0)


def test_bounded_child_is_stopped_at_its_limit():
    """A child whose work never ends (it sleeps after ``go``) is killed at the limit: None, and
    the call returns long before the child would have finished.  No timing is asserted beyond
    that the 600 s sleep was cut short."""
    from fastopt.apps import bench as _b

    code = ("import sys, time; print('ready', flush=True); sys.stdin.readline(); "
            "time.sleep(600); print(1.0, flush=True)")
    t0 = time.perf_counter()
    assert _b._bounded_child(code, [], 0.5) is None
    assert time.perf_counter() - t0 < 300
    fast = "import sys; print('ready', flush=True); sys.stdin.readline(); print(0.25, flush=True)"
    assert _b._bounded_child(fast, [], 120.0) == 0.25


def test_muon_bounded_mode_reports_an_upper_bound_when_torch_is_stopped(monkeypatch):
    """When torch's child is stopped, the row carries fastopt's time / limit as an upper bound
    of fastopt/torch instead of a ratio."""
    from fastopt.apps import bench as _b

    monkeypatch.setattr(_b, "_torch_muon_bounded", lambda n, dtype, limit_s: None)
    monkeypatch.setattr(_b, "torch_module", lambda: object())  # bounded: torch is not imported here
    m = _b.muon_vs_torch(8, rounds=1, backend="numpy", torch_limit_s=2.0)
    assert m["torch_finished"] is False and m["ratio_kind"] == "upper_bound"
    assert m["torch_s"] is None and m["ratio"] is None
    assert m["ratio_upper_bound"] == pytest.approx(m["fastopt_s"] / 2.0)
    row = _b.format_muon(m)
    assert "torch.optim.Muon > " in row and "fastopt/torch < " in row


# --------------------------------------------------------------------------- --speed


@pytest.mark.skipif(not (HAS_NUMBA and HAS_TORCH), reason="needs numba and torch")
def test_speed_table_has_every_target_row_with_its_peer(capsys):
    # tiny sizes and one pair per row: the rows and their peers, not the figures
    assert main(["bench", "--speed", "--json", "--no-progress", "--speed-n", "3000", "--reps", "1",
                 "--no-first-step", "--omp-wait-policy", "inherit"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "unset")
    rows = {r["case"]: r for r in res["rows"]}
    for rule in ("Adam", "SGD-momentum", "Adagrad"):
        for mode, goal in (('"ignore"', None), ("default", 1.15 if rule == "Adam" else 1.2)):
            r = rows[f"{rule} {mode} 3e3"]
            assert r["peer"] == "torch fused" and r["goal"] == goal
    for model in ("demo MLP (26,634)", "1000 x 256"):
        assert rows[f"{model} Adam default, 1 thread"]["goal"] == 0.5
        assert rows[f'{model} Adam "ignore", 1 thread']["peer"] == "torch fused"
    assert rows["read pass (check) 3e3"]["peer"] == "BLAS dot"
    assert rows["Adam + clip_global_norm 3e3"]["peer"] == "fastopt Adam"
    assert rows["AdaHessian 3e3 (32/28 B)"]["peer"] == "fastopt Adam"
    for r in res["rows"]:  # each ratio is the median of per-pair ratios of its own two times
        assert r["fastopt_s"] > 0 and r["peer_s"] > 0 and r["ratio"] > 0
    assert res["first_step"] is None and len(res["rows"]) == 13
    text = _bench.format_speed_table(res)
    assert len(text.splitlines()) == 2 + 13 and "torch fused" in text


def test_speed_wait_policy_is_set_only_before_an_openmp_runtime_starts(monkeypatch):
    pools = ("torch", "numba.np.ufunc.omppool", "numba.np.ufunc.tbbpool",
             "numba.np.ufunc.workqueue")
    for m in pools:
        monkeypatch.delitem(sys.modules, m, raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    assert _bench._set_wait_policy("inherit") == "active"
    assert _bench._set_wait_policy("passive") == "passive"
    assert os.environ["OMP_WAIT_POLICY"] == "passive"
    monkeypatch.setitem(sys.modules, "numba.np.ufunc.omppool", object())  # a runtime started
    said = _bench._set_wait_policy("active")
    assert said == "passive (numba.np.ufunc.omppool already loaded)"
    assert os.environ["OMP_WAIT_POLICY"] == "passive"  # too late to change: left alone


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
def test_asv_speed_benchmarks_set_up_and_step(asv_suite):
    sp = asv_suite["bench_speed"]
    runs = [(sp.DefaultStep(), ("adam", "demo"))]
    if HAS_TORCH:
        runs.append((sp.TorchFusedStep(), ("adam", "demo")))
    for bench, params in runs:
        bench.setup(*params)
        bench.time_step(*params)
