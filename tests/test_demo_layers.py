"""The demo network with ``--batchnorm`` and ``--dropout P`` (``fastopt.layers`` inside the MLP)."""

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the demo's data set ships with scikit-learn")

from fastopt import _cli  # noqa: E402
from fastopt.apps import demo as _demo  # noqa: E402


@pytest.mark.parametrize("batchnorm, dropout", [(True, 0.0), (False, 0.3), (True, 0.3)])
def test_mlp_with_layers_backward_matches_finite_differences(batchnorm, dropout):
    rng = np.random.default_rng(4)
    net = _demo.MLP((5, 7, 6, 4), rng, np.float64, batchnorm=batchnorm, dropout=dropout, seed=3,
                    layer_backend="numpy")
    assert len(net.params) == 6 + 4 * batchnorm
    for p in net.params[1::2]:
        p[...] = rng.standard_normal(p.shape) * 0.1
    x = rng.standard_normal((9, 5))
    y = rng.integers(0, 4, 9)

    def train_loss():  # the training-mode loss with the same dropout step every time
        net.step = 0
        return net.loss_and_grads(x, y)[0]

    net.step = 0
    loss, grads = net.loss_and_grads(x, y)
    h = 1e-6
    for p, g in zip(net.params, grads):
        assert g.shape == p.shape and g.dtype == p.dtype
        num = np.empty_like(p)
        for i in np.ndindex(p.shape):
            keep = p[i]
            p[i] = keep + h
            up = train_loss()
            p[i] = keep - h
            down = train_loss()
            p[i] = keep
            num[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-7)
    if dropout:
        # training draws a new mask each step; evaluation has none and is deterministic
        net.step = 0
        assert net.loss_and_grads(x, y)[0] != net.loss_and_grads(x, y)[0]
        assert net.loss(x, y) == net.loss(x, y)


def test_train_with_batchnorm_and_dropout_learns():
    data = _demo.load_digits_split(seed=0)
    r = _demo.train("adam", data, epochs=1, max_steps=40, batchnorm=True, dropout=0.2,
                    backend="numpy")
    assert r.train_loss < 0.5 * r.initial_loss and r.test_acc > 0.6


def test_cli_batchnorm_dropout(capsys):
    rc = _cli.main(["demo", "-o", "adam", "-e", "1", "--backend", "numpy", "--no-progress",
                    "--batchnorm", "--dropout", "0.1"])
    out = capsys.readouterr().out
    assert rc == 0 and "batchnorm, dropout 0.1" in out and "adam" in out


@pytest.mark.parametrize("argv", [["--dropout", "1"], ["--dropout", "-0.1"], ["--dropout", "x"]])
def test_cli_rejects_bad_dropout(argv, capsys):
    with pytest.raises(SystemExit):
        _cli.main(["demo", "--no-progress", *argv])
    assert "--dropout" in capsys.readouterr().err


def test_cli_xor_refuses_layers(capsys):
    assert _cli.main(["demo", "--xor", "--batchnorm", "--no-progress"]) == 2
    assert "--batchnorm" in capsys.readouterr().err
