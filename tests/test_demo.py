"""``python -m fastopt demo``: the training code on every backend, the XOR net, the CLI.

The digits runs are short (a few dozen minibatch steps): enough for the loss to
fall well below its starting value and the test accuracy to leave chance (10%)
far behind, on every backend that takes NumPy arrays.
"""

import argparse
import math

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the demo's data set ships with scikit-learn")

from fastopt import _cli  # noqa: E402
from fastopt.apps import demo as _demo  # noqa: E402

NUMPY_BACKENDS = _demo.numpy_backends()


@pytest.fixture(scope="module")
def digits():
    return _demo.load_digits_split(seed=0)


def _backend_or_skip(name):
    if NUMPY_BACKENDS[name] is not None:
        pytest.skip(f"backend {name!r} unavailable: {NUMPY_BACKENDS[name]}")
    return name


# ---------------------------------------------------------------- data and network

def test_digits_split_is_standardised_and_fixed_by_seed(digits):
    d = digits
    assert d.x_train.dtype == np.float32 and d.x_train.flags.c_contiguous
    assert len(d.y_train) + len(d.y_test) == 1797
    assert abs(len(d.y_test) - 0.2 * 1797) < 1
    assert set(np.unique(d.y_train)) == set(range(10))
    # standardised with the train statistics: mean 0, std 1 except the constant pixels
    assert np.allclose(d.x_train.mean(axis=0), 0, atol=1e-5)
    std = d.x_train.std(axis=0)
    assert np.all(np.isclose(std, 1, atol=1e-4) | (std == 0))
    again = _demo.load_digits_split(seed=0)
    assert np.array_equal(again.y_test, d.y_test) and np.array_equal(again.x_train, d.x_train)
    other = _demo.load_digits_split(seed=1)
    assert not np.array_equal(other.y_test, d.y_test)


def test_mlp_backward_matches_finite_differences():
    rng = np.random.default_rng(3)
    net = _demo.MLP((5, 7, 6, 4), rng, np.float64)
    for p in net.params[1::2]:  # non-zero biases so every gradient term is exercised
        p[...] = rng.standard_normal(p.shape) * 0.1
    x = rng.standard_normal((9, 5))
    y = rng.integers(0, 4, 9)
    loss, grads = net.loss_and_grads(x, y)
    assert loss == pytest.approx(net.loss(x, y), rel=1e-12)
    h = 1e-6
    for p, g in zip(net.params, grads):
        assert g.shape == p.shape
        num = np.empty_like(p)
        for i in np.ndindex(p.shape):
            keep = p[i]
            p[i] = keep + h
            up = net.loss(x, y)
            p[i] = keep - h
            down = net.loss(x, y)
            p[i] = keep
            num[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- training, every backend

@pytest.mark.parametrize("name", ["adam", "momentum"])
@pytest.mark.parametrize("backend", sorted(NUMPY_BACKENDS))
def test_train_few_steps_learns_on_every_backend(digits, backend, name):
    _backend_or_skip(backend)
    r = _demo.train(name, digits, epochs=1, max_steps=40, backend=backend, seed=0)
    assert r.backend == backend
    assert r.steps == 40 and r.diverged_at is None
    assert r.initial_loss > 2.0  # about ln(10) at the start
    assert r.train_loss < 0.5 * r.initial_loss
    assert r.test_acc > 0.6  # chance is 0.1
    assert r.step_s > 0 and 0 < r.opt_share < 1


@pytest.mark.parametrize("backend", sorted(set(NUMPY_BACKENDS) - {"numpy"}))
def test_compiled_backend_trains_like_the_reference(digits, backend):
    """The same run on a compiled backend follows the NumPy reference closely."""
    _backend_or_skip(backend)
    ref = _demo.train("adam", digits, epochs=1, max_steps=25, backend="numpy", seed=4)
    fast = _demo.train("adam", digits, epochs=1, max_steps=25, backend=backend, seed=4)
    # float32 through 25 steps of a 3-layer net: the kernels agree to ~1e-6 per step
    assert fast.train_loss == pytest.approx(ref.train_loss, rel=1e-3)
    assert abs(fast.test_acc - ref.test_acc) <= 2 / len(digits.y_test)


def test_default_optimizers_all_learn(digits):
    assert {"sgd", "momentum", "adam", "adamw", "rmsprop", "adagrad", "lion"} <= set(
        _demo.DEFAULT_OPTIMIZERS)
    for name in _demo.DEFAULT_OPTIMIZERS:
        r = _demo.train(name, digits, epochs=1, max_steps=45, backend="numpy", seed=0)
        assert r.train_loss < 0.7 * r.initial_loss, name
        assert r.test_acc > 0.5, name


def test_clip_global_norm_reaches_the_optimizer(digits):
    free = _demo.train("sgd", digits, epochs=1, max_steps=20, backend="numpy")
    tight = _demo.train("sgd", digits, epochs=1, max_steps=20, backend="numpy",
                        clip_global_norm=1e-3)
    # lr 0.1 and a norm of 1e-3 moves the weights by at most 2e-3 in 20 steps
    assert free.train_loss < 0.6 * free.initial_loss
    assert tight.train_loss > 0.97 * tight.initial_loss


@pytest.mark.parametrize("kind", _demo.SCHEDULES)
def test_schedules(kind, digits):
    s = _demo.make_schedule(kind, 0.01, 100)
    if kind == "constant":
        assert s == 0.01
        return
    values = [s(t) for t in range(100)]
    assert max(values) == pytest.approx(0.01)
    assert values[-1] < 0.5 * 0.01
    if kind == "warmup":
        assert values[0] < values[5] < values[10]
    else:
        assert values[0] == pytest.approx(0.01)
    r = _demo.train("adam", digits, epochs=1, max_steps=30, backend="numpy", schedule=kind)
    assert r.train_loss < 0.7 * r.initial_loss
    assert r.lr == _demo.default_lr("adam")  # the table shows the peak, not the first step's lr


def test_divergence_is_reported_not_raised(digits):
    r = _demo.train("sgd", digits, epochs=2, lr=1e6, backend="numpy")
    assert r.diverged_at is not None and r.diverged_at <= r.steps + 1
    assert "diverged at step" in _demo.format_table([r])


# ---------------------------------------------------------------- XOR

@pytest.mark.parametrize("name", ["adam", "momentum", "lion"])
def test_xor_network_learns_xor(name):
    r = _demo.train_xor(name, steps=300, seed=0, backend="numpy")
    assert r.accuracy == 1.0
    assert r.loss < 0.05 < r.initial_loss
    p = np.array(r.probabilities)
    assert np.array_equal(p > 0.5, _demo.XOR_Y == 1)


# ---------------------------------------------------------------- command line

def _parser():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    _demo.register(sub)
    return parser


def test_cli_parsing_defaults_and_options():
    a = _parser().parse_args(["demo"])
    assert a.func is _demo.run and a.backend == "auto" and a.schedule == "constant"
    assert a.epochs is None and a.lr is None and a.clip_global_norm is None and not a.xor
    assert _demo._parse_optimizers(a.optimizer) == list(_demo.DEFAULT_OPTIMIZERS)

    a = _parser().parse_args(["demo", "--optimizer", "adam", "sgd,lion", "--backend", "numpy",
                              "--epochs", "3", "--lr", "adam=2e-3,0.05", "--schedule", "warmup",
                              "--clip-global-norm", "1.5", "--plot", "x.png", "--seed", "7",
                              "--xor", "--threads", "1"])
    assert _demo._parse_optimizers(a.optimizer) == ["adam", "sgd", "lion"]
    assert a.backend == "numpy" and a.epochs == 3 and a.schedule == "warmup"
    assert a.lr == {"adam": 2e-3, "*": 0.05}
    assert _demo._lr_for(a.lr, "adam") == 2e-3 and _demo._lr_for(a.lr, "sgd") == 0.05
    assert a.clip_global_norm == 1.5 and a.plot == "x.png" and a.seed == 7 and a.xor
    assert a.threads == 1
    assert _demo._parse_optimizers(["all"]) == list(_demo.OPTIMIZER_SPECS)


@pytest.mark.parametrize("argv", [["demo", "--schedule", "linearish"], ["demo", "--epochs", "0"],
                                  ["demo", "--lr", "-1"], ["demo", "--lr", "adamx=1"],
                                  ["demo", "--clip-global-norm", "nan"],
                                  ["demo", "--backend", "tpu"], ["demo", "--threads", "0"]])
def test_cli_rejects_bad_options(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(argv)
    assert e.value.code == 2


def test_cli_unknown_optimizer_is_an_error(capsys):
    assert _cli.main(["demo", "--optimizer", "adamm", "--no-progress"]) == 2
    assert "adamm" in capsys.readouterr().err


def test_cli_end_to_end_table_and_plot(tmp_path, capsys):
    png = tmp_path / "curves.png"
    rc = _cli.main(["demo", "-o", "adam,sgd", "-e", "2", "--backend", "numpy", "--no-progress",
                    "--schedule", "cosine", "--clip-global-norm", "5", "--plot", str(png)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "backend numpy" in out and "schedule cosine" in out and "clip_global_norm 5" in out
    header = next(line for line in out.splitlines() if line.startswith("optimizer"))
    for col in ("train loss", "test acc", "ms/step", "opt share"):
        assert col in header
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["adam"], ["sgd"])]
    assert [r[0] for r in rows] == ["adam", "sgd"]
    for r in rows:
        assert float(r[3].rstrip("%")) > 80  # 2 epochs already pass 80% on digits
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert f"plot: {png}" in out


def test_cli_xor(capsys, tmp_path):
    png = tmp_path / "xor.png"
    assert _cli.main(["demo", "--xor", "-o", "adam", "-e", "300", "--backend", "numpy",
                      "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("adam"))
    assert "4/4" in row
    assert png.stat().st_size > 5_000


def test_plain_progress_bar(capsys, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    bar = _demo._PlainBar(40, "adam")
    for _ in range(40):
        bar.update(1)
    bar.set_postfix_str("loss 0.1")
    bar.close()
    err = capsys.readouterr().err
    assert "adam" in err and "100%" in err and "loss 0.1" in err and "#" * 20 in err
    assert math.isclose(bar.n, 40)


def test_numba_threads_default_and_limit():
    _backend_or_skip("numba")
    import numba

    before = numba.get_num_threads()
    try:
        assert _demo._numba_threads(None, 26_634) == 1  # the default MLP: one kernel part
        assert numba.get_num_threads() == 1
        numba.set_num_threads(before)
        assert _demo._numba_threads(None, 10**8) == before
        most = numba.config.NUMBA_NUM_THREADS
        assert "at most" in _demo._numba_threads(most + 1, 10)
    finally:
        numba.set_num_threads(before)


def test_muon_row_splits_hidden_matrices_from_the_rest(digits):
    """The demo's Muon row: Muon gets the hidden layers' weight matrices, AdamW the output
    layer and every 1-D param; it learns digits and XOR."""
    net = _demo.MLP((64, 20, 16, 10), np.random.default_rng(0))
    opt = _demo.make_optimizer("muon", net.params, backend="numpy")
    assert opt.hidden == [0, 2]  # W1 (64x20), W2 (20x16); W3 (16x10) is the output layer
    assert opt.rest == [1, 3, 4, 5]
    assert type(opt.muon).__name__ == "Muon" and type(opt.adamw).__name__ == "AdamW"
    before = [p.copy() for p in net.params]
    opt.step([np.ones_like(p) for p in net.params])
    assert all(not np.array_equal(a, b) for a, b in zip(before, net.params))
    x = _demo.train_xor("muon", steps=300, seed=0, backend="numpy")
    assert x.accuracy == 1.0 and x.loss < 0.05


@pytest.mark.parametrize("name", ["lars", "adafactor", "lbfgs"])
def test_new_rows_learn_digits(digits, name):
    """LARS, Adafactor and L-BFGS (full batch, closure-based) each train the digits MLP."""
    r = _demo.train(name, digits, epochs=1 if name != "lbfgs" else 2, max_steps=40,
                    backend="numpy", seed=0)
    assert r.diverged_at is None
    assert r.steps == (2 if name == "lbfgs" else 40)
    assert r.train_loss < 0.5 * r.initial_loss, name
    assert r.test_acc > 0.6, name
    assert r.step_s > 0 and 0 < r.opt_share < 1


def test_lars_row_groups_biases_without_trust_ratio_or_decay():
    net = _demo.MLP((6, 5, 3), np.random.default_rng(0))
    opt = _demo.make_optimizer("lars", net.params, backend="numpy")
    assert opt.mats == [0, 2] and opt.rest == [1, 3]
    g0, g1 = opt.opt.param_groups
    assert g0["weight_decay"] > 0 and g0["trust_ratio"] is True
    assert g1["weight_decay"] == 0 and g1["trust_ratio"] is False
    # the grads are handed on in the groups' order: a bias grad moves its bias only
    before = [p.copy() for p in net.params]
    grads = [np.zeros_like(p) for p in net.params]
    grads[3][:] = 1.0
    opt.step(grads)
    lr = _demo.default_lr("lars")
    np.testing.assert_allclose(net.params[3], before[3] - lr, rtol=1e-6)  # tau = 1 for biases
    np.testing.assert_array_equal(net.params[1], before[1])  # zero grad, no decay
    # a zero-grad matrix moves by its trust-scaled decay only: along -W
    step = net.params[0] - before[0]
    np.testing.assert_allclose(step, -before[0] * (np.abs(step).sum() / np.abs(before[0]).sum()),
                               rtol=1e-3, atol=1e-9)


def test_lbfgs_row_refuses_what_it_cannot_take(digits):
    net = _demo.MLP((6, 5, 3), np.random.default_rng(0))
    with pytest.raises(ValueError, match="schedule"):
        _demo.make_optimizer("lbfgs", net.params, schedule="cosine", total_steps=10)
    with pytest.raises(ValueError, match="clip_global_norm"):
        _demo.make_optimizer("lbfgs", net.params, clip_global_norm=1.0)
    x = _demo.train_xor("lbfgs", steps=5, seed=0, backend="numpy")
    assert x.accuracy == 1.0 and x.loss < 1e-3


# ---------------------------------------------------------------- --sparse (SparseAdam)

def test_digit_tokens_are_pixel_level_rows():
    tr, ytr, te, yte = _demo.load_digit_tokens(seed=0)
    assert tr.shape == (len(ytr), 64) and te.shape == (len(yte), 64)
    assert tr.dtype == np.int64 and tr.min() >= 0 and tr.max() < 64 * 17
    # token // 17 is the pixel, in order; the split is load_digits_split's
    np.testing.assert_array_equal(tr // 17, np.broadcast_to(np.arange(64), tr.shape))
    np.testing.assert_array_equal(ytr, _demo.load_digits_split(seed=0).y_train)


def test_sparse_adam_touches_only_the_batch_rows_and_learns():
    data = _demo.load_digit_tokens(seed=0)
    net = _demo.EmbeddingBag(64 * 17, 8, 10, np.random.default_rng(0))
    from fastopt import SparseAdam

    opt = SparseAdam([net.table], lr=1e-2, backend="numpy")
    before = net.table.copy()
    tokens = data[0][:5]
    _, (idx, vals), _, _ = net.loss_and_grads(tokens, data[1][:5])
    assert idx.shape == (5 * 64,) and vals.shape == (5 * 64, 8)
    opt.step([(idx, vals)])
    moved = np.flatnonzero((net.table != before).any(axis=1))
    np.testing.assert_array_equal(moved, np.unique(tokens))  # only the batch's rows
    r = _demo.train_sparse(True, max_steps=90, dim=8, backend="numpy", data=data)
    d = _demo.train_sparse(False, max_steps=90, dim=8, backend="numpy", data=data)
    assert r.steps == d.steps == 90
    assert r.train_loss < 0.5 * r.initial_loss and d.train_loss < 0.5 * d.initial_loss
    assert r.test_acc > 0.6 and d.test_acc > 0.6
    assert r.rows_per_step < d.rows_per_step == 64 * 17


def test_cli_sparse(capsys):
    assert _cli.main(["demo", "--sparse", "--epochs", "1", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "SparseAdam" in out and "Adam (dense)" in out and "of 1088" in out
    assert _cli.main(["demo", "--sparse", "-o", "adam"]) == 2
    assert "--sparse" in capsys.readouterr().err


def test_cli_lbfgs_with_a_schedule_is_skipped_or_refused(capsys):
    assert _cli.main(["demo", "-o", "lbfgs", "--schedule", "cosine", "--no-progress"]) == 2
    assert "lbfgs takes neither --schedule" in capsys.readouterr().err
    assert _cli.main(["demo", "-o", "sgd,lbfgs", "--clip-global-norm", "1", "-e", "1",
                      "--backend", "numpy", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "no lbfgs row" in out and "\nsgd " in out and "\nlbfgs " not in out


@pytest.mark.parametrize("name", ["lars", "adafactor", "lbfgs"])
def test_hogwild_and_distributed_refuse_the_whole_tensor_rows(name, capsys):
    assert _cli.main(["demo", "--hogwild", "2", "-o", name]) == 2
    assert f"element-wise rules ({name}" in capsys.readouterr().err
