"""``python -m fastopt demo --lesson NAME``: each lesson, shortened, teaches its direction."""

import math

import pytest

from fastopt import _cli
from fastopt.apps import lessons

B = "numpy"  # tiny arrays: the reference is the quickest and needs no compile


def test_momentum_converges_in_fewer_steps():
    L = lessons.momentum(steps=600, backend=B)
    sgd, hb, nes = (L.row(v).metric for v in ("sgd", "heavy-ball (0.9)", "nesterov (0.9)"))
    assert math.isfinite(sgd) and hb < sgd and nes < sgd


def test_adaptive_methods_beat_one_global_step_size():
    L = lessons.adaptive(steps=200, backend=B)
    sgd = L.rows[0]
    assert sgd.variant.startswith("sgd")
    for r in L.rows[1:]:
        assert r.final_loss < 1e-3 * sgd.final_loss, r.variant


def test_clipping_keeps_the_exploding_run_finite():
    L = lessons.clipping(steps=80, backend=B)
    assert not math.isfinite(L.row("no clipping").final_loss)
    for v in ("clip_value=1", "clip_norm=1"):
        r = L.row(v)
        assert math.isfinite(r.metric) and r.final_loss < r.curve[0], v


def test_decay_goes_below_the_constant_noise_floor():
    L = lessons.decay(steps=300, backend=B)
    const = L.row("constant").metric
    for v in ("exponential", "step", "cosine"):
        assert L.row(v).metric < 0.5 * const, v


def test_newton_needs_far_fewer_iterations():
    L = lessons.second_order(max_iters=3000, backend=B)
    gd, newton = L.row("gradient descent").metric, L.row("damped newton").metric
    assert newton <= 10 and newton * 20 < gd
    assert L.row("damped newton").final_loss == pytest.approx(L.row("gradient descent").final_loss,
                                                             rel=1e-6)


def test_batchnorm_trains_the_deep_net_faster():
    L = lessons.batchnorm(epochs=1, backend=B, max_steps=30)
    assert L.row("batchnorm").metric < L.row("plain").metric


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dropout_narrows_the_train_test_gap(seed):
    L = lessons.dropout(epochs=25, backend="auto", seed=seed)
    plain, drop = L.row("no dropout"), L.row("dropout p=0.5")
    assert drop.metric < 0.75 * plain.metric, (plain.metric, drop.metric)
    assert drop.final_loss > plain.final_loss  # dropout keeps it from memorising the noise


def test_cli_lesson_table_and_plot(tmp_path, capsys):
    path = tmp_path / "lesson.png"
    assert _cli.main(["demo", "--lesson", "clipping", "--backend", "numpy", "--plot",
                      str(path)]) == 0
    out = capsys.readouterr().out
    assert "no clipping" in out and "diverged" in out and path.stat().st_size > 0


def test_cli_unknown_lesson(capsys):
    with pytest.raises(SystemExit):
        _cli.main(["demo", "--lesson", "nope"])
    assert "--lesson" in capsys.readouterr().err
