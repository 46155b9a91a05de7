"""fastopt.distributed on real MPI ranks: ``mpiexec -n W python -m mpi4py tests/mpi/sharded_cases.py``.

Each case launches W = 1, 2 or 3 ranks (3 oversubscribe the 2-core CI machine; MPICH
needs no flag for it) with a timeout.  The checks run inside the ranks and raise on a
mismatch; ``python -m mpi4py`` turns that into an abort of the job, so a failure is a
non-zero exit here with the rank's traceback in the output.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastopt as fo
from fastopt.distributed import ShardedOptimizer, shard_ranges

pytest.importorskip("mpi4py")

HERE = Path(__file__).parent
SCRIPT = HERE / "mpi" / "sharded_cases.py"
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install 'fastopt[mpi]')")


def launch(n, *args, timeout=120):
    env = dict(os.environ, PYTHONUNBUFFERED="1", NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    cmd = [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py", str(SCRIPT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=HERE.parent)


def assert_ok(proc, n, mode):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for r in range(n):
        assert f"rank {r} ok {mode}" in out, out[-4000:]
    return out


@needs_mpiexec
@pytest.mark.parametrize("n", [1, 2, 3])
def test_sharded_step_equals_single_process_step(n):
    """Every element-wise rule of tests/_cases.py, mixed dtypes and uneven sizes: params,
    gathered state, step count and NAdam's group state bit for bit equal to one process
    stepping on the rank-ordered average (tolerance with norm clips, whose partial sums
    of a split tensor round differently); grad_norm identical on every rank."""
    out = assert_ok(launch(n, "parity"), n, "parity")
    from _cases import CASES
    from fastopt._rules import RULES

    want = sum(RULES[rule].kind == "elementwise" for rule, _, _ in CASES)
    assert want >= 22 and f"{want} cases" in out


@needs_mpiexec
def test_empty_shards():
    """8 elements over 3 ranks: ranks 1 and 2 hold no state yet take part in every
    collective (norm clips, max_norm and the flags included)."""
    assert_ok(launch(3, "parity", "--tiny", "--only", "adam-globalnorm-maxnorm", "sgd-all-pipeline",
                     "adahessian", "nadam"), 3, "parity")


@needs_mpiexec
@pytest.mark.parametrize("n", [2, 3])
def test_mpi_reduce_scatter_order(n):
    """sum_order='mpi' (MPI_Reduce_scatter): bit-exact at W = 2 (a + b == b + a), within
    tolerance at W = 3, where MPICH's summation order is its own."""
    assert_ok(launch(n, "parity", "--sum-order", "mpi", "--only", "adam", "sgd-momentum-wd",
                     "nadam", "adam-globalnorm-maxnorm"), n, "parity")


@needs_mpiexec
def test_numba_backend_bit_exact():
    """The compiled kernels on shard pieces give the bits they give on whole tensors."""
    fo.Adam([np.ones(3, np.float32)], backend="numba").step([np.ones(3, np.float32)])  # warm the cache
    assert_ok(launch(2, "parity", "--backend", "numba", "--only", "adam", "sgd-momentum-wd"),
              2, "parity")


@needs_mpiexec
def test_checkpoint_gather_and_scatter():
    """save() on rank 0 loads into a single-process Adam; load() scatters it back onto 3
    ranks and the next step equals the single process's; a bad state_dict raises on
    every rank and changes nothing; each rank holds its shard of the state only."""
    out = assert_ok(launch(3, "checkpoint"), 3, "checkpoint")
    found = re.findall(r"state bytes on this rank (\d+) of (\d+)", out)
    held, total = [int(h) for h, _ in found], int(found[0][1])
    assert len(held) == 3 and sum(held) == total and max(held) < total


@needs_mpiexec
def test_nonfinite_decision_is_global():
    """An inf in one rank's shard skips (or raises) on every rank, nothing written."""
    assert_ok(launch(3, "nonfinite"), 3, "nonfinite")


@needs_mpiexec
def test_bad_input_raises_on_every_rank():
    """Bad grads on rank 0 and params that differ between ranks: a clear error on every
    rank, nothing written; LAMB and Newton are refused."""
    assert_ok(launch(2, "bad"), 2, "bad")


@needs_mpiexec
def test_a_failing_rank_aborts_the_job():
    """A rank that raises outside any collective ends the whole job, non-zero, within the
    timeout (python -m mpi4py calls MPI_Abort) instead of leaving the others waiting."""
    proc = launch(2, "raise", timeout=60)
    assert proc.returncode != 0
    assert "deliberate failure" in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- no MPI needed

def test_shard_ranges_cover_and_hold_at_most_a_block_over_the_fair_share():
    for total in (0, 1, 255, 256, 257, 1000, 10 ** 6 + 3):
        for world in (1, 2, 3, 7):
            starts, counts = shard_ranges(total, world, 256)
            assert starts[0] == 0 and sum(counts) == total
            assert all(s + c == n for s, c, n in zip(starts, counts, starts[1:]))
            assert all(s % 256 == 0 for s, c in zip(starts, counts) if c)
            assert max(counts) <= total / world + 256  # the state per rank: 1/W (+ one block)


@pytest.mark.parametrize("rule, opts, match", [
    ("lamb", {}, "LAMB cannot be sharded"),
    ("newton", {}, "Newton cannot be sharded"),
    ("muon", {}, "Muon cannot be sharded .it orthogonalizes each whole matrix"),
    ("adafactor", {}, "Adafactor cannot be sharded .its factored second moments"),
    ("adamm", {}, "rule: expected a fastopt optimizer class"),
    ("adam", {"sum_order": "tree"}, "sum_order: expected one of"),
    ("adam", {"betas": (0.9, 1.5)}, r"betas\[1\]: expected a number in \[0, 1\)"),
    ("adam", {"momentum": 0.9}, "unexpected keyword"),
])
def test_bad_options_refused_before_any_communication(rule, opts, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ShardedOptimizer(rule, [np.zeros(3, np.float32)], **opts)


def test_bad_params_refused():
    with pytest.raises(TypeError, match="param-group dicts are not supported"):
        ShardedOptimizer("adam", [{"params": [np.zeros(3)]}])
    with pytest.raises(TypeError, match=r"params\[1\]: expected dtype float16, bfloat16, float32 or float64"):
        ShardedOptimizer(fo.Adam, [np.zeros(3), np.zeros(3, np.int32)])
    with pytest.raises(ValueError, match=r"stochastic_rounding: expected False for params\[0\]"):
        ShardedOptimizer(fo.Adam, [np.zeros(3, np.float16)], stochastic_rounding=True)


def test_hogwild_still_refuses_sixteen_bit_params():
    from fastopt.distributed import check_param_list, split_options

    with pytest.raises(TypeError, match=r"params\[0\]: expected dtype float32 or float64"):
        check_param_list([np.zeros(3, np.float16)])
    with pytest.raises(TypeError, match="unexpected keyword"):
        split_options(fo.Adam, {"state_dtype": "q8"})


def test_shifted_seed_shifts_the_rounding_index():
    """A shard's piece starting at ``offset`` (a multiple of 4) within its param draws, at
    index i, the bits the whole param draws at i + offset: stochastic rounding is the
    one-process rounding.  An offset inside a group of four is refused."""
    from fastopt import precision as P
    from fastopt.distributed import shifted_seed

    for seed, step, offset in ((0, 1, 256), (9, 7, 1000), (2 ** 64 - 1, 3, 76)):
        i = np.arange(41, dtype=np.uint64)
        assert np.array_equal(P.sr_bits(shifted_seed(seed, step, offset), step, i),
                              P.sr_bits(seed, step, i + np.uint64(offset)))
    for bad in (77, 2, -4, 4.0):
        with pytest.raises(ValueError, match=r"offset: expected a non-negative multiple of 4"):
            shifted_seed(1, 1, bad)


def test_stochastic_rounding_layout_starts_params_on_groups_of_four():
    """Params rounded stochastically start at a multiple of 4 of their buffer, so with
    ``block`` a multiple of 4 every piece's offset within its param is one too."""
    from fastopt.distributed import make_layouts
    from fastopt.precision import resolve_precision

    BF16 = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    params = [np.zeros(n, BF16) for n in (5, 30, 7, 9)]
    pr = resolve_precision(BF16, stochastic_rounding=True, seed=3)
    (L,) = make_layouts(params, 1, 3, 8, [pr] * 4)
    assert L.offsets == [0, 8, 40, 48] and L.total == 60
    for r in range(3):
        for q in make_layouts(params, r, 3, 8, [pr] * 4)[0].pieces:
            assert q.lo % 4 == 0
    with pytest.raises(ValueError, match=r"block: expected a multiple of 4 with stochastic_rounding"):
        ShardedOptimizer("adam", [np.zeros(10, BF16)], block=6, stochastic_rounding=True)


@pytest.mark.parametrize("opts, params, match", [
    (dict(master_weights=True, max_norm=1.0), [np.zeros(3, np.float16)], "max_norm: expected None"),
    (dict(state_dtype="q8", block=100), [np.zeros(5000, np.float32)], "block: expected a multiple of 256"),
])
def test_precision_options_that_cannot_be_sharded(opts, params, match):
    with pytest.raises(ValueError, match=match):
        ShardedOptimizer("adam", params, **opts)
    with pytest.raises(ValueError, match="centered"):
        ShardedOptimizer("rmsprop", [np.zeros(5000, np.float32)], state_dtype="q8", centered=True)


def test_q8_layout_aligns_every_param_to_a_block():
    params = [np.zeros(n, np.float32) for n in (5000, 30, 700, 4097)]
    opt = ShardedOptimizer("adam", params, state_dtype="q8", min_8bit_size=500)
    q8 = [L for L in opt.layouts if L.q8]
    assert len(q8) == 1 and [params[i].size for i in q8[0].tensors] == [5000, 700, 4097]
    assert q8[0].offsets == [0, 5120, 5888] and q8[0].total == 5888 + 4352
    assert opt.state_nbytes() == (30 * 4 * 2) + 2 * (q8[0].total + q8[0].total // 256 * 4)


@needs_mpiexec
@pytest.mark.parametrize("n", [2, 3])
def test_sharded_precision_options_equal_single_process(n):
    """bfloat16/float16 params, 16-bit and q8 state, master weights, stochastic rounding:
    params and every state array bit for bit the one-process step's, through a gathered
    and a per-rank checkpoint too (tests/mpi/sharded_cases.py, run_precision)."""
    out = assert_ok(launch(n, "precision"), n, "precision")
    assert "6 precision cases" in out


@needs_mpiexec
def test_demo_distributed_is_bit_exact():
    """``mpiexec -n 2 python -m mpi4py -m fastopt demo --distributed``, one short epoch: the
    sharded run equals its one-process replay (max |diff| 0) and each rank holds half."""
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", "-m", "fastopt", "demo",
           "--distributed", "--epochs", "1", "--hidden", "16", "-o", "adam", "momentum",
           "--backend", "numpy"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("adam ", "momentum "))]
    assert len(rows) == 2, proc.stdout
    for row in rows:
        assert row[5] == "0", proc.stdout  # max |diff|
        assert row[4] == row[3], proc.stdout  # test accuracy of both runs
        held = [int(x) for x in row[8:11:2]]
        # half each, give or take one 256-element block per state array (at most 2 here)
        assert sum(held) == int(row[12]) and max(held) <= sum(held) / 2 + 2 * 256 * 4, proc.stdout

