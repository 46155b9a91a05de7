"""ZeRO stage 1 on MPI: each of W ranks keeps 1/W of the optimizer state.

``ShardedOptimizer(rule, params, comm=None, **options)`` wraps one of fastopt's
optimizer rules for data-parallel training with mpi4py (``pip install
fastopt[mpi]`` brings ``mpi4py`` and the ``mpich`` wheel; launch with
``mpiexec -n W python -m mpi4py script.py`` so that a rank that raises aborts
the whole job instead of leaving the others waiting).

Every rank passes the same list of params (replicated) and, at each step, its
*local* grads.  A step is::

    pack grads (one flat buffer per dtype, layout cached)
    sum across ranks, keep this rank's shard, divide by W      (reduce-scatter)
    one read pass over the shard: per-tensor sums of squares, non-finite flag
    one small allgather of those partial sums -> global norms and flag
    the rule's fused kernel on this rank's shard of params and state
    allgather of the updated params back into every rank's params

The averaged gradient is ``(g_0 + g_1 + ... + g_{W-1}) / W`` in the grads'
dtype.  With ``sum_order="rank"`` (the default) the sum is done left to right
in rank order on the owning rank (an ``Alltoallv`` moves the same bytes as a
reduce-scatter and each rank adds its W slices itself), so the sharded step is
bit-for-bit the single-process step on those averaged grads, for every W.
``sum_order="mpi"`` uses ``MPI_Reduce_scatter``, whose summation order is the
MPI library's choice: still bit-exact at W = 2 (``a + b == b + a``), within
float rounding of the sum for W > 2.

The pipeline options stay exact in meaning: ``clip_global_norm`` and
``clip_norm`` use the norms of whole tensors over all ranks, ``max_norm`` the
norm of each whole param, and the non-finite decision is one decision taken
identically on every rank (so ``nonfinite="raise"`` raises on every rank and
``"skip"`` skips on every rank).  The partial sums of squares of a tensor
split across two shards are added in rank order, so a norm equals the
single-process one to float64 rounding (bit-exact for tensors that lie within
one shard).  ``StepInfo`` is the same object on every rank.

Rules: every element-wise rule (``Rule.kind == "elementwise"``: SGD, Adam,
AdamW, Adagrad, RMSprop, Adadelta, Adamax, NAdam, RAdam, Lion, AdaHessian,
whose Hessian diagonals are averaged like the grads).  LAMB's trust ratio
needs ``||p||`` and ``||r||`` of whole tensors in the middle of its fused
kernel, and Newton solves a dense system per tensor: both are refused with a
``ValueError``.

Input errors are agreed on before anything is written: if the grads of one
rank are bad, that rank raises its own error and every other rank raises a
``ValueError`` naming it; no param or state changes anywhere.  Params that
differ in shape or dtype between ranks are refused at construction on every
rank.  Arrays travel only through mpi4py's buffer (upper-case) collectives;
small metadata (an error flag, a checkpoint's hyperparameters) through
``bcast``.

Communicators: :class:`MPIComm` (mpi4py, the default) or :class:`TorchComm`
(an initialised ``torch.distributed`` process group, gloo on CPU, for jobs that
already run one); both offer the same few collectives.

Precision options (``state_dtype`` including ``"q8"``, ``min_8bit_size``,
``master_weights``, ``stochastic_rounding``, ``seed``) and float16/bfloat16 params
work as in one process, bit for bit: grads of 16-bit params are summed and
averaged in float32; a piece of a param that starts at offset ``lo`` is rounded
stochastically with :func:`shifted_seed` (the hash takes the index within the
param, one hash per group of four elements: such params start at a multiple of 4
of their flat buffer and ``block`` must be a multiple of 4, so ``lo`` is one); q8 params start on a 256-element block of their flat buffer, so shards
hold whole blocks (docs/design.md, "Distributed").  ``max_norm`` with such
params is refused (their kernels apply it per tensor).

Limits: one param group; NumPy arrays (CuPy arrays would have to stage
through host memory: the MPI wheels on PyPI are not CUDA-aware; NCCL would need
the params on the GPU).
"""

from __future__ import annotations

import copy
import time
import zlib
from dataclasses import dataclass

import numpy as np

import dataclasses

from . import _backend
from . import precision as _prec
from . import quantization as _q
from ._optim import OPTIMIZERS, Optimizer
from ._pipeline import StepInfo, clip_scales
from ._rules import CLIP_EPS, COPY_OF_PARAM, ELEMENTWISE, PIPELINE_DEFAULTS, PRECISION_DEFAULTS, \
    as_host_scalars, check_hyperparameters, check_lr_value
from ._state import MAP_NAMES, precision_record
from ._validate import (check_companions, check_disjoint, check_grad_scale, check_nonfinite, check_params,
                        check_q8_options, expected_layout, grad_dtype_check, param_precision,
                        resolve_precisions)

#: Shard boundaries fall on multiples of this many elements, so the ranks' state
#: sizes differ by at most one block (and a future block-quantized state never
#: straddles two ranks).
BLOCK = 256
#: Elements that share one hash of stochastic rounding (``fastopt.precision.sr_bits``): a
#: piece of a param rounded stochastically starts at a multiple of this within it.
SR_GROUP = 4

SUM_ORDERS = ("rank", "mpi")


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("fastopt.distributed needs mpi4py: pip install 'fastopt[mpi]' "
                          "(mpi4py and the mpich wheel)") from e
    return MPI


def resolve_rule(rule) -> type:
    """A fastopt optimizer class from a class or a name (``"adam"``, ``"AdamW"``)."""
    if isinstance(rule, type) and issubclass(rule, Optimizer) and rule.rule is not None:
        return rule
    if isinstance(rule, str):
        by_name = {k.lower(): v for k, v in OPTIMIZERS.items()}
        by_name.update({v.__name__.lower(): v for v in OPTIMIZERS.values()})
        cls = by_name.get(rule.lower())
        if cls is not None:
            return cls
    raise ValueError(f"rule: expected a fastopt optimizer class or one of {sorted(OPTIMIZERS)}, "
                     f"got {rule!r}")


def split_options(cls, options: dict, precision: bool = False) -> tuple:
    """``(hyperparameters, nonfinite, backend)`` from constructor options, checked;
    ``precision=True``: the precision options (``state_dtype``, ...) are allowed and left
    out of the result (the caller reads them), else they are unexpected keywords."""
    if precision:
        options = {k: v for k, v in options.items() if k not in PRECISION_DEFAULTS}
    options = dict(options)
    nonfinite = check_nonfinite(options.pop("nonfinite", "raise"))
    backend = options.pop("backend", "auto")
    defaults = {**cls.rule.defaults, **PIPELINE_DEFAULTS}
    unknown = set(options) - set(defaults)
    if unknown:
        raise TypeError(f"{cls.__name__}: unexpected keyword argument(s) {sorted(unknown)}")
    hp = {**defaults, **options}
    if isinstance(hp.get("betas"), list):
        hp["betas"] = tuple(hp["betas"])
    check_hyperparameters(cls.rule, hp)
    return hp, nonfinite, backend


def check_param_list(params, sixteen_bit: bool = False) -> list:
    """The params as a list of NumPy arrays (one group), checked as an optimizer checks them;
    float16/bfloat16 params only with ``sixteen_bit`` (hogwild has no precision options)."""
    if _backend.array_kind(params) is not None:
        raise TypeError("params: expected a list of arrays, got a single array (wrap it in a list)")
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"params: expected a list of arrays, got {type(params).__name__}")
    params = list(params)
    if params and any(isinstance(p, dict) for p in params):
        raise TypeError("params: expected a list of arrays; param-group dicts are not supported "
                        "here (one group)")
    kind = check_params(params, [f"params[{i}]" for i in range(len(params))])
    for i, p in enumerate(params):
        if p.dtype.itemsize == 2 and not sixteen_bit:
            raise TypeError(f"params[{i}]: expected dtype float32 or float64 (this optimizer "
                            f"has no float16/bfloat16 support), got {p.dtype}")
    if kind != "numpy":
        raise TypeError("params: expected NumPy arrays, got CuPy arrays (the MPI wheels are not "
                        "CUDA-aware; copy to host memory first)")
    return params


@dataclass
class Piece:
    """The part ``[lo, hi)`` (flat element indices) of tensor ``tensor`` that a shard holds,
    at offset ``at`` within the shard."""

    tensor: int
    lo: int
    hi: int
    at: int


@dataclass
class DtypeLayout:
    """One flat buffer of params of one dtype and one precision: its tensors, their offsets,
    and the W shard ranges."""

    dtype: np.dtype
    tensors: list    # indices into params
    offsets: list    # start of each tensor in the flat buffer
    total: int
    starts: list     # shard start of every rank
    counts: list     # shard length of every rank
    pieces: list     # of Piece, this rank's
    #: the params' resolved ``fastopt.precision.Precision`` (None: plain float32/float64)
    precision: object = None

    @property
    def q8(self) -> bool:
        return self.precision is not None and self.precision.state is _prec.Q8

    @property
    def grad_dtype(self) -> np.dtype:
        """The dtype grads are summed and averaged in: float32 for 16-bit params (a 16-bit
        grad widens exactly), else the params' dtype."""
        return np.dtype(np.float32) if self.dtype.itemsize == 2 else self.dtype


def shard_ranges(total: int, world: int, block: int = BLOCK) -> tuple:
    """``(starts, counts)`` of ``world`` shards of ``total`` elements cut at ``block`` multiples."""
    nblocks = -(-total // block)
    per, extra = divmod(nblocks, world)
    starts, counts = [], []
    for r in range(world):
        b0 = r * per + min(r, extra)
        b1 = b0 + per + (r < extra)
        lo, hi = min(b0 * block, total), min(b1 * block, total)
        starts.append(lo)
        counts.append(hi - lo)
    return starts, counts


def make_layouts(params: list, rank: int, world: int, block: int = BLOCK,
                 precisions: list | None = None) -> list:
    """One :class:`DtypeLayout` per dtype (and precision) of ``params``, pieces of ``rank``.

    ``precisions``: each param's resolved precision (None: plain).  Params with 8-bit
    state (``state_dtype="q8"``) start at a multiple of the quantization block in their
    buffer (the gap is padding no piece covers), so that shard boundaries, which fall on
    multiples of ``block``, are also block boundaries of every param: each rank then
    holds whole blocks of codes with their absmax, and its step is the one-process step.
    Params rounded stochastically start at a multiple of :data:`SR_GROUP` the same way,
    so that every piece starts on a group of the rounding hash (see :func:`shifted_seed`).
    """
    precisions = precisions or [None] * len(params)
    keys = [(p.dtype, pr) for p, pr in zip(params, precisions)]
    out = []
    for dt, pr in sorted(set(keys), key=lambda k: (str(k[0]), repr(k[1]))):
        idx = [i for i, k in enumerate(keys) if k == (dt, pr)]
        pad = (_q.BLOCKSIZE if pr is not None and pr.state is _prec.Q8
               else SR_GROUP if pr is not None and pr.stochastic_rounding else 1)
        offsets, total = [], 0
        for i in idx:
            offsets.append(total)
            total += -(-params[i].size // pad) * pad
        starts, counts = shard_ranges(total, world, block)
        s, e = starts[rank], starts[rank] + counts[rank]
        pieces = []
        for i, off in zip(idx, offsets):
            lo, hi = max(s, off), min(e, off + params[i].size)
            if lo < hi:
                pieces.append(Piece(i, lo - off, hi - off, lo - s))
        out.append(DtypeLayout(np.dtype(dt), idx, offsets, total, starts, counts, pieces, pr))
    return out


def _unmix64(z: int) -> int:
    """The inverse of ``fastopt.precision.mix64`` on one Python int (each of its steps is a
    bijection of 64-bit words: an xor-shift by s >= 32 undoes itself, one by s < 32 is undone
    by repeating it, and an odd multiplier has an inverse modulo 2**64)."""
    m = (1 << 64) - 1

    def unxorshift(x, s):
        y = x
        for _ in range(64 // s + 1):
            y = x ^ (y >> s)
        return y & m

    z = unxorshift(z, 31)
    z = (z * pow(0x94D049BB133111EB, -1, 1 << 64)) & m
    z = unxorshift(z, 27)
    z = (z * pow(0xBF58476D1CE4E5B9, -1, 1 << 64)) & m
    return unxorshift(z, 30)


def shifted_seed(seed: int, step: int, offset: int) -> int:
    """A seed whose stochastic-rounding bits at ``(step, i)`` are ``seed``'s at
    ``(step, i + offset)``, for every element index ``i``; ``offset`` a multiple of
    :data:`SR_GROUP` (ValueError otherwise).

    A kernel hashes the index of an element within the array it is given
    (``fastopt.precision.sr_bits``: slice ``i & 3`` of ``mix64(K + (i >> 2)*G)`` with the
    step key ``K = mix64(mix64(seed + G) + step*G)``); a shard's piece of a param starts at
    ``offset`` within it.  For ``offset = 4*q``, element ``i + offset`` is in group
    ``(i >> 2) + q`` at the same slice, and ``K + ((i >> 2) + q)*G == (K + q*G) + (i >> 2)*G``;
    both mixes are invertible, so the seed whose step key is ``K + q*G`` exists and is
    computed here: the kernels need no offset argument, and a sharded step rounds every
    element exactly as the one-process step does (tests/test_distributed.py checks it).
    ``make_layouts`` starts every such param at a multiple of 4 in its buffer and shard
    boundaries fall on multiples of ``block`` (a multiple of 4 then), so offsets are too.
    """
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0 \
            or offset % SR_GROUP:
        raise ValueError(f"offset: expected a non-negative multiple of {SR_GROUP} (the elements "
                         f"that share one stochastic-rounding hash), got {offset!r}")
    m, g = (1 << 64) - 1, 0x9E3779B97F4A7C15
    key = (_prec.step_key(seed, step) + (int(offset) // SR_GROUP) * g) & m
    return (_unmix64((_unmix64(key) - step * g) & m) - g) & m


def _flat(a):
    return a.reshape(-1)


# --------------------------------------------------------------------------- the local step

@dataclass
class Part:
    """What the kernel sees for one dtype: flat lists (pieces) of params, grads, extras, state."""

    params: list
    grads: list
    extras: list | None
    states: dict
    tensor: np.ndarray  # the tensor index of each piece
    #: the pieces' resolved precision (None: plain) and where each piece starts in its
    #: param (stochastic rounding hashes the index within the param: see shifted_seed)
    precision: object = None
    los: list | None = None


def read_stats(ops, parts: list, n_tensors: int, hp: dict, inv_scale, nonfinite: str):
    """Phase 1 of a step on the pieces: ``(sumsq per tensor or None, finite)``.

    ``sumsq[i]`` holds the sum of squares (after unscaling and ``clip_value``)
    of the elements of tensor ``i`` in these pieces: a partial sum when the
    tensor is split.  Nothing is written.
    """
    need = hp["clip_norm"] is not None or hp["clip_global_norm"] is not None
    check = nonfinite != "ignore"
    if not (need or check):
        return None, True
    sumsq = np.zeros(n_tensors) if need else None
    finite = True
    for part in parts:
        if not part.params:
            continue
        s, f = ops.grad_stats(part.grads, part.extras, inv_scale=inv_scale,
                              clip_value=hp["clip_value"], need_sumsq=need, check_finite=check)
        finite = finite and bool(f)
        if need:
            np.add.at(sumsq, part.tensor, np.asarray(s, dtype=np.float64))
    return sumsq, finite


def write_step(ops, kernel, parts: list, n_tensors: int, scales, hp: dict, scalars: dict, inv_scale,
               param_norms, step: int = 0):
    """Phase 2: the fused kernel on every part, then ``max_norm``.

    ``scales`` are per-tensor clip factors (or None); ``param_norms(partial)``
    turns per-tensor partial sums of squares of the new params into whole-tensor
    ones (an allgather across ranks, or nothing in one process).
    """
    from ._backend import Pre

    for part in parts:
        if not part.params:
            continue
        prec = part.precision
        calls = [(None, prec)]
        if prec is not None and prec.stochastic_rounding and any(part.los):
            # a piece that starts inside its param gets the seed that shifts its indices
            calls = [([i for i, lo in enumerate(part.los) if not lo], prec)] + [
                ([i], dataclasses.replace(prec, seed=shifted_seed(prec.seed, step, lo)))
                for i, lo in enumerate(part.los) if lo]
        for idx, pr in calls:
            if idx == []:
                continue
            sub = (lambda xs: xs) if idx is None else (lambda xs: [xs[i] for i in idx])
            tensor = part.tensor if idx is None else part.tensor[idx]
            pre = Pre(inv_scale=inv_scale, maximize=hp["maximize"], clip_value=hp["clip_value"],
                      scales=None if scales is None else scales[tensor],
                      weight_clip=hp["weight_clip"], precision=pr, step=step)
            states = part.states if idx is None else {n: sub(v) for n, v in part.states.items()}
            kernel(sub(part.params), sub(part.grads), states, scalars, pre,
                   None if part.extras is None else sub(part.extras))
    if hp["max_norm"] is not None:
        partial = np.zeros(n_tensors)
        for part in parts:
            if part.params:
                np.add.at(partial, part.tensor, np.asarray(ops.sumsq(part.params), dtype=np.float64))
        norms = np.sqrt(param_norms(partial))
        factors = np.minimum(1.0, hp["max_norm"] / (norms + CLIP_EPS))
        for part in parts:
            if part.params:
                ops.scale_(part.params, factors[part.tensor])


# --------------------------------------------------------------------------- communicator

def _wire(a):
    """``a`` as the collectives can send it: a bfloat16 array (``ml_dtypes``, which neither
    MPI's buffer protocol nor ``torch.from_numpy`` takes) as an int16 view of its bits (TorchComm
    sends it as float16: gloo has no 16-bit integers); anything else (None included) as it is.  Only copies, never sums,
    use this."""
    if a is not None and a.dtype.itemsize == 2 and a.dtype.kind not in "fiu":
        return a.view(np.int16)
    return a


class MPIComm:
    """The few collectives a sharded step needs, on an mpi4py communicator (buffers only)."""

    sum_orders = SUM_ORDERS

    def __init__(self, comm=None):
        MPI = _mpi()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def allgather_rows(self, row: np.ndarray) -> np.ndarray:
        """``(size, len(row))``: every rank's ``row`` (same length and dtype everywhere)."""
        row = np.ascontiguousarray(row)
        out = np.empty((self.size,) + row.shape, row.dtype)
        self.comm.Allgather(row, out)
        return out

    def sum_shard(self, send: np.ndarray, recv: np.ndarray, scratch, starts, counts, order: str):
        """``recv`` = this rank's shard of the sum over ranks of ``send``.

        ``order="rank"``: ``recv`` must be ``scratch[:n]``; the W slices arrive in
        ``scratch`` and are added left to right in rank order, in place.
        """
        MPI, W, r = self.MPI, self.size, self.rank
        if order == "mpi":
            self.comm.Reduce_scatter(send, recv, counts, op=MPI.SUM)
            return
        n = counts[r]
        self.comm.Alltoallv([send, (counts, starts)],
                            [scratch, ([n] * W, [k * n for k in range(W)])])
        for k in range(1, W):  # left to right in rank order: a deterministic sum
            recv += scratch[k * n:(k + 1) * n]

    def allgather_shards(self, buf: np.ndarray, starts, counts):
        """Every rank's ``buf[starts[r]:starts[r]+counts[r]]`` into every rank's ``buf``."""
        self.comm.Allgatherv(self.MPI.IN_PLACE, [_wire(buf), (counts, starts)])

    def gather_shards(self, shard: np.ndarray, full, starts, counts, root: int):
        self.comm.Gatherv(_wire(shard), [_wire(full), (counts, starts)] if self.rank == root
                          else None, root=root)

    def scatter_shards(self, full, shard: np.ndarray, starts, counts, root: int):
        self.comm.Scatterv([_wire(full), (counts, starts)] if self.rank == root else None,
                           _wire(shard), root=root)

    def bcast_array(self, a: np.ndarray, root: int):
        self.comm.Bcast(_wire(a), root=root)

    def bcast_object(self, obj, root: int):
        return self.comm.bcast(obj, root=root)


class TorchComm:
    """The same collectives on ``torch.distributed`` (an initialised process group; gloo on CPU).

    For fastopt.torch users whose job already runs a process group.  NumPy
    buffers are shared with torch tensors (``torch.from_numpy``, no copy).
    The rank-ordered sum uses ``all_to_all_single``; uneven shards are
    gathered through chunks padded to the largest shard (one extra copy).
    Only ``sum_order="rank"``.  NCCL needs CUDA tensors: not done here, as
    ShardedOptimizer takes NumPy arrays.
    """

    sum_orders = ("rank",)

    def __init__(self, group=None):
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("comm: TorchComm needs torch.distributed.init_process_group() first")
        self.torch, self.dist, self.group = torch, dist, group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def _t(self, a):
        t = self.torch.from_numpy(_wire(a))
        # gloo has no 16-bit integer type: 16-bit bit patterns (bfloat16 on the wire) travel
        # as float16, which broadcast and gather copy without looking at the values
        return t.view(self.torch.float16) if t.dtype == self.torch.int16 else t

    def allgather_rows(self, row: np.ndarray) -> np.ndarray:
        row = np.ascontiguousarray(row)
        out = np.empty((self.size,) + row.shape, row.dtype)
        self.dist.all_gather([self._t(out[k]) for k in range(self.size)], self._t(row), group=self.group)
        return out

    def sum_shard(self, send, recv, scratch, starts, counts, order):
        n, W = counts[self.rank], self.size
        self.dist.all_to_all_single(self._t(scratch), self._t(send), [n] * W, list(counts),
                                    group=self.group)
        for k in range(1, W):  # left to right in rank order, as MPIComm
            recv += scratch[k * n:(k + 1) * n]

    def _padded_gather(self, chunk, counts):
        chunk = _wire(chunk)
        m = max(counts)
        pad = np.zeros(m, chunk.dtype)
        pad[:len(chunk)] = chunk
        out = np.empty((self.size, m), chunk.dtype)
        self.dist.all_gather([self._t(out[k]) for k in range(self.size)], self._t(pad), group=self.group)
        return out

    def allgather_shards(self, buf, starts, counts):
        buf = _wire(buf)
        s, n = starts[self.rank], counts[self.rank]
        rows = self._padded_gather(buf[s:s + n], counts)
        for k in range(self.size):
            buf[starts[k]:starts[k] + counts[k]] = rows[k, :counts[k]]

    def gather_shards(self, shard, full, starts, counts, root):
        full = _wire(full)
        rows = self._padded_gather(shard, counts)  # every rank receives; only root keeps them
        if self.rank == root:
            for k in range(self.size):
                full[starts[k]:starts[k] + counts[k]] = rows[k, :counts[k]]

    def scatter_shards(self, full, shard, starts, counts, root):
        full, shard = _wire(full), _wire(shard)
        m = max(counts)
        buf = np.zeros((self.size, m), shard.dtype)
        if self.rank == root:
            for k in range(self.size):
                buf[k, :counts[k]] = full[starts[k]:starts[k] + counts[k]]
        self.dist.broadcast(self._t(buf), src=root, group=self.group)
        shard[...] = buf[self.rank, :len(shard)]

    def bcast_array(self, a, root):
        self.dist.broadcast(self._t(a), src=root, group=self.group)

    def bcast_object(self, obj, root):
        box = [obj]
        self.dist.broadcast_object_list(box, src=root, group=self.group)
        return box[0]


# --------------------------------------------------------------------------- the optimizer

class ShardedOptimizer:
    """ZeRO-1: ``rule``'s optimizer with its state split over the ranks of ``comm``.

    ``rule``: a fastopt optimizer class (``fastopt.AdamW``) or its name;
    ``params``: the full list of params, the same shapes and dtypes on every
    rank; ``comm``: an mpi4py communicator (default ``MPI.COMM_WORLD``), an
    :class:`MPIComm`, or a :class:`TorchComm` (torch.distributed, gloo);
    ``options``: the rule's constructor options (``lr``, ``betas``, pipeline
    options, ``nonfinite``, ``backend``).  ``sum_order``: ``"rank"`` (default,
    deterministic, bit-exact) or ``"mpi"`` (``MPI_Reduce_scatter``), see the
    module docstring.  ``sync_params=True`` broadcasts rank 0's params at
    construction (as torch's DistributedDataParallel does), so replicas that
    were initialised differently start equal.

    Every method that communicates is collective: call it on every rank.
    """

    def __init__(self, rule, params, comm=None, *, sum_order="rank", sync_params=True,
                 block=BLOCK, **options):
        self._cls = resolve_rule(rule)
        self.rule = self._cls.rule
        if self.rule.kind != ELEMENTWISE:
            why = ("its trust ratio needs whole-tensor norms of p and of the update inside the "
                   "fused kernel" if self.rule.kind == "trust_ratio"
                   else "it orthogonalizes each whole matrix" if self.rule.kind == "orthogonalize"
                   else "its factored second moments need whole-tensor row and column sums"
                   if self.rule.kind == "factored"
                   else "it solves a dense system per tensor")
            raise ValueError(f"rule: {self._cls.__name__} cannot be sharded ({why}); "
                             f"ShardedOptimizer takes element-wise rules only")
        if sum_order not in SUM_ORDERS:
            raise ValueError(f"sum_order: expected one of {SUM_ORDERS}, got {sum_order!r}")
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"block: expected an integer >= 1, got {block!r}")
        self._options = dict(options)
        self.hp, self.nonfinite, backend = split_options(self._cls, options, precision=True)
        self.params = check_param_list(params, sixteen_bit=True)
        self.precision_options = {k: options.get(k, v) for k, v in PRECISION_DEFAULTS.items()}
        by_dtype = resolve_precisions(self.rule, self.params,
                                      [f"params[{i}]" for i in range(len(self.params))],
                                      self.precision_options)
        # per param: None when plain; a tensor below min_8bit_size keeps float32 state
        self._precisions = [
            None if _backend.is_plain(pr) else pr
            for pr in (param_precision(by_dtype, p, self.precision_options["min_8bit_size"])
                       for p in self.params)]
        if any(pr is not None and pr.stochastic_rounding for pr in self._precisions) \
                and block % SR_GROUP:
            raise ValueError(f"block: expected a multiple of {SR_GROUP} with "
                             f"stochastic_rounding=True (a shard must start on a group of "
                             f"{SR_GROUP} elements, which share one rounding hash), got {block}")
        if any(pr is not None and pr.state is _prec.Q8 for pr in self._precisions) \
                and block % _q.BLOCKSIZE:
            raise ValueError(f"block: expected a multiple of {_q.BLOCKSIZE} with "
                             f"state_dtype='q8' (a shard must hold whole quantization blocks), "
                             f"got {block}")
        self._check_precision_hp(self.hp)
        self.backend = _backend.resolve(backend, "numpy",
                                        tuple(pr for pr in self._precisions if pr is not None))
        self.comm = comm if isinstance(comm, (MPIComm, TorchComm)) else MPIComm(comm)
        if sum_order not in self.comm.sum_orders:
            raise ValueError(f"sum_order: {type(self.comm).__name__} offers {self.comm.sum_orders}, "
                             f"got {sum_order!r}")
        self.rank, self.world = self.comm.rank, self.comm.size
        self.sum_order = sum_order
        self._check_same_params()

        self.layouts = make_layouts(self.params, self.rank, self.world, block, self._precisions)
        self._n = len(self.params)
        self._want = expected_layout(self.params)
        # one send buffer per layout: packed grads, then (after the reduction) the params,
        # except for 16-bit params, whose grads are summed in float32 (a buffer of their
        # own: ``_pbuf``); zeros, so that padding (q8 layouts) stays zero in every sum
        self._send = [np.zeros(L.total, L.grad_dtype) for L in self.layouts]
        self._pbuf = [buf if L.grad_dtype == L.dtype else np.zeros(L.total, L.dtype)
                      for L, buf in zip(self.layouts, self._send)]
        # the reduced shard; in rank order it is the head of the buffer the W slices arrive in
        self._scratch = [self._landing(L) for L in self.layouts]
        self._recv = [self._shard_of(L, sc) for L, sc in zip(self.layouts, self._scratch)]
        extra = self.rule.extra is not None
        self._xsend = [np.zeros(L.total, L.grad_dtype) if extra else None for L in self.layouts]
        self._xscratch = [self._landing(L) if extra else None for L in self.layouts]
        self._xrecv = [self._shard_of(L, sc) if extra else None
                       for L, sc in zip(self.layouts, self._xscratch)]
        self.step_count = 0
        self._gstate = dict(self.rule.group_state)
        #: seconds of the phases of the last step taken: ``reduce`` (pack + reduce-scatter +
        #: average), ``stats`` (norms, non-finite check, their allgather), ``update`` (the
        #: kernel on this shard, ``max_norm``), ``allgather`` (params to every rank)
        self.last_timings = {}
        if sync_params and self.world > 1:
            for p in self.params:
                self.comm.bcast_array(p, 0)
        self._init_state()  # after the sync: a state may start as a copy of its param

    # ------------------------------------------------------------------ construction

    def _landing(self, L):
        n = L.counts[self.rank]
        return np.empty(n * self.world, L.grad_dtype) if self.sum_order == "rank" else None

    def _shard_of(self, L, scratch):
        n = L.counts[self.rank]
        return scratch[:n] if scratch is not None else np.empty(n, L.grad_dtype)

    def _check_precision_hp(self, hp):
        """Options the precision options of some params cannot take here, ValueError."""
        if any(pr is not None and pr.state is _prec.Q8 for pr in self._precisions):
            check_q8_options(self.rule, hp)
        if hp.get("max_norm") is not None and any(pr is not None for pr in self._precisions):
            raise ValueError("max_norm: expected None with 16-bit params or a state_dtype other "
                             "than the params' dtype in ShardedOptimizer (those kernels apply it "
                             "per tensor before their one rounding, and a shard holds pieces of "
                             f"tensors), got {hp['max_norm']!r}")

    def _state_template(self, hp) -> list:
        """Per layout, ``{name: (dtype, length, start value, signed)}`` of the shard's state
        arrays under options ``hp``: the rule's state in the state dtype; with q8, uint8 codes
        plus ``<name>_absmax`` (one float32 per block); ``master`` (float32) with master
        weights."""
        out = []
        nonneg = set(self.rule.nonnegative_state)
        for L in self.layouts:
            n, pr, t = L.counts[self.rank], L.precision, {}
            for name, init in self.rule.state(hp):
                if L.q8:
                    t[name] = (np.dtype(np.uint8), n, init, name not in nonneg)
                    t[name + "_absmax"] = (np.dtype(np.float32), n // _q.BLOCKSIZE, None, None)
                else:
                    t[name] = (L.dtype if pr is None else np.dtype(pr.state), n, init, None)
            if pr is not None and pr.master_weights:
                t["master"] = (np.dtype(np.float32), n, None, None)
            out.append(t)
        return out

    @staticmethod
    def _unit(name) -> int:
        """Elements of the flat buffer per entry of the state array ``name`` (absmax: a block)."""
        return _q.BLOCKSIZE if name.endswith("_absmax") else 1

    def _check_same_params(self):
        """Shapes and dtypes must agree on every rank (else every rank raises)."""
        counts = self.comm.allgather_rows(np.array([len(self.params)], np.int64))[:, 0]
        if len(set(counts.tolist())) > 1:
            raise ValueError(f"params: expected the same number of params on every rank, got "
                             f"{counts.tolist()} (ranks 0..{self.world - 1})")
        rows = np.array([[p.dtype.num, p.ndim, p.size, zlib.crc32(repr(p.shape).encode())]
                         for p in self.params], np.int64).reshape(-1)
        everyone = self.comm.allgather_rows(rows).reshape(self.world, len(self.params), 4)
        differ = (everyone != everyone[0]).any(axis=(0, 2))
        if differ.any():
            i = int(np.flatnonzero(differ)[0])
            others = [r for r in range(self.world) if (everyone[r, i] != everyone[self.rank, i]).any()]
            p = self.params[i]
            raise ValueError(f"params[{i}]: expected the same shape and dtype on every rank, got "
                             f"{p.dtype} {p.shape} on rank {self.rank} and something else on "
                             f"rank(s) {others}")

    def _initial(self, L, n, init, dt):
        """A shard state array of ``n`` entries: ``init`` everywhere, or (``COPY_OF_PARAM``,
        Schedule-Free's z) this rank's pieces of the params in the state dtype."""
        if not (isinstance(init, str) and init == COPY_OF_PARAM):
            return np.full(n, init, dt)
        a = np.zeros(n, dt)
        for q in L.pieces:
            a[q.at:q.at + q.hi - q.lo] = _flat(self.params[q.tensor])[q.lo:q.hi].astype(dt)
        return a

    def _init_state(self):
        """Flat shard state per layout, and the kernel's views into it."""
        self._state = []
        for L, tmpl in zip(self.layouts, self._state_template(self.hp)):
            st = {}
            for name, (dt, n, init, signed) in tmpl.items():
                if name == "master":
                    # exact: the param is RNE of it (its shard's pieces; padding stays 0)
                    a = np.zeros(n, dt)
                    for q in L.pieces:
                        a[q.at:q.at + q.hi - q.lo] = _prec.to_float32(
                            _flat(self.params[q.tensor])[q.lo:q.hi])
                elif dt == np.uint8:
                    # the start value quantized per block: the same codes and absmax as the
                    # one-process state has (a constant block quantizes alike, whole or not)
                    codes, st[name + "_absmax"] = _q.quantize_blockwise(
                        np.full(n, init, np.float32), signed=signed)
                    a = np.full(n, _q.zero_code(signed), np.uint8)  # padding: the zero code
                    for q in L.pieces:
                        a[q.at:q.at + q.hi - q.lo] = codes[q.at:q.at + q.hi - q.lo]
                elif name.endswith("_absmax"):
                    continue
                else:
                    a = self._initial(L, n, init, dt)
                st[name] = a
            self._state.append(st)
        self._parts = []
        for L, recv, xrecv, st in zip(self.layouts, self._recv, self._xrecv, self._state):
            ps = L.pieces
            sl = [slice(q.at, q.at + q.hi - q.lo) for q in ps]
            bl = [slice(q.at // _q.BLOCKSIZE, -(-(q.at + q.hi - q.lo) // _q.BLOCKSIZE))
                  for q in ps]
            self._parts.append(Part(
                params=[_flat(self.params[q.tensor])[q.lo:q.hi] for q in ps],
                grads=[recv[s] for s in sl],
                extras=None if xrecv is None else [xrecv[s] for s in sl],
                states={n: [a[b] for b in bl] if n.endswith("_absmax") else [a[s] for s in sl]
                        for n, a in st.items()},
                tensor=np.array([q.tensor for q in ps], np.intp),
                precision=L.precision, los=[q.lo for q in ps]))

    # ------------------------------------------------------------------ agreement

    def _agree(self, err):
        """Raise on every rank when any rank hit an error (``err`` is this rank's or None)."""
        flags = self.comm.allgather_rows(np.array([err is not None], np.int64))[:, 0]
        if flags.any():
            if err is not None:
                raise err
            bad = np.flatnonzero(flags).tolist()
            raise ValueError(f"rank(s) {bad} rejected the input of this collective call (see the "
                             f"error on those ranks); nothing was written on any rank")

    # ------------------------------------------------------------------ public

    @property
    def lr(self):
        lr = self.hp["lr"]
        return float(lr(self.step_count)) if callable(lr) else lr

    @lr.setter
    def lr(self, value):
        if not callable(value):
            check_lr_value(value)
        self.hp["lr"] = value

    @property
    def group_state(self) -> list:
        """The per-group scalar state (NAdam's ``mu_product``), one dict per group, as the
        optimizer classes hold it."""
        return [dict(self._gstate)]

    def state_nbytes(self) -> int:
        """Bytes of optimizer state on this rank (its shard only)."""
        return sum(a.nbytes for st in self._state for a in st.values())

    def step(self, grads, *args, grad_scale=None):
        """One data-parallel step with this rank's local ``grads``; collective.

        The wrapped class's signature: ``step(grads, grad_scale=None)``, and for
        AdaHessian ``step(grads, hessian_diags, grad_scale=None)`` (the
        diagonals are averaged across ranks like the grads).
        """
        n_extra = 1 if self.rule.extra is not None else 0
        if len(args) > n_extra + 1 or (len(args) == n_extra + 1 and grad_scale is not None):
            raise TypeError(f"step() takes grads{', ' + self.rule.extra if n_extra else ''} and "
                            f"grad_scale, got {1 + len(args)} positional arguments")
        if len(args) < n_extra:
            raise TypeError(f"{self._cls.__name__}.step() needs {self.rule.extra}")
        if len(args) == n_extra + 1:
            grad_scale = args[-1]
        return self._step(grads, args[0] if n_extra else None, grad_scale)

    def _validate(self, grads, extras, grad_scale, t):
        inv_scale = check_grad_scale(grad_scale)
        label = lambda name, i: f"{name}[{i}]"  # noqa: E731
        grads = check_companions(self.params, grads, "grads", label, "numpy", allow_copy=True,
                                 want=self._want, dtype_check=grad_dtype_check)
        if self.rule.extra is not None:
            if extras is None:
                raise TypeError(f"{self._cls.__name__}.step() needs {self.rule.extra}")
            extras = check_companions(self.params, extras, self.rule.extra, label, "numpy",
                                      allow_copy=True, want=self._want,
                                      dtype_check=grad_dtype_check)
        check_disjoint([("params", self.params)],
                       [("grads", grads)] + ([(self.rule.extra, extras)] if extras is not None else []))
        hp = as_host_scalars(self.hp)
        if callable(hp["lr"]):
            hp["lr"] = float(hp["lr"](t - 1))
            check_lr_value(hp["lr"], f"lr (the schedule's value at step {t - 1})")
        self._check_precision_hp(hp)
        return grads, extras, inv_scale, hp

    def _step(self, grads, extras, grad_scale):
        t = self.step_count + 1
        err = None
        try:
            grads, extras, inv_scale, hp = self._validate(grads, extras, grad_scale, t)
        except (TypeError, ValueError) as e:
            err, grads, extras = e, None, None  # still take part in the collectives, then raise

        ops = _backend.get_ops(self.backend)
        kernel = _backend.get_kernel(self.rule.name, self.backend)
        clock = time.perf_counter
        t0 = clock()
        for k, L in enumerate(self.layouts):
            self._reduce(grads, L, self._send[k], self._recv[k], self._scratch[k])
            if self.rule.extra is not None:
                self._reduce(extras, L, self._xsend[k], self._xrecv[k], self._xscratch[k])

        # phase 1: one small allgather carries every rank's input-error flag, non-finite
        # flag and per-tensor partial sums of squares; nothing user-visible is written yet
        t1 = clock()
        sumsq, finite = None, True
        if err is None:
            sumsq, finite = read_stats(ops, self._parts, self._n, hp, inv_scale, self.nonfinite)
        row = np.zeros(self._n + 2)
        row[0] = err is not None
        row[1] = not finite
        if sumsq is not None:
            row[2:] = sumsq
        rows = self.comm.allgather_rows(row)
        t2 = clock()
        if rows[:, 0].any():
            if err is not None:
                raise err
            bad = np.flatnonzero(rows[:, 0]).tolist()
            raise ValueError(f"rank(s) {bad} rejected their step input (see the error on those "
                             f"ranks); nothing was written on any rank")
        if sumsq is not None:
            sumsq = rows[0, 2:].copy()
            for k in range(1, self.world):  # rank order: the same bits on every rank
                sumsq += rows[k, 2:]
        if rows[:, 1].any():
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    "non-finite averaged gradient (inf or nan) after unscaling, on some rank's "
                    "shard; nothing was written on any rank (pass nonfinite='skip' to skip such "
                    "steps)")
            return StepInfo(skipped=True, group_state=(dict(self._gstate),))

        # phase 2: the shard's update, then every rank's params
        scales = gnorm = None
        if sumsq is not None:
            scales, gnorm = clip_scales(np, sumsq, hp)
        scalars, new_gs = self.rule.step_scalars(hp, t, self._gstate)
        write_step(ops, kernel, self._parts, self._n, scales, hp, scalars, inv_scale, self._param_norms,
                   step=t)
        t3 = clock()
        for k, L in enumerate(self.layouts):
            if self.world == 1:
                break  # the one shard is every param, updated in place
            buf = self._pbuf[k]
            for q in L.pieces:
                s = L.starts[self.rank] + q.at
                buf[s:s + q.hi - q.lo] = _flat(self.params[q.tensor])[q.lo:q.hi]
            self.comm.allgather_shards(buf, L.starts, L.counts)
            # copy back what other ranks updated; this rank's shard is in the params already
            s0, s1 = L.starts[self.rank], L.starts[self.rank] + L.counts[self.rank]
            for i, off in zip(L.tensors, L.offsets):
                n = self.params[i].size
                flat = _flat(self.params[i])
                if off < s0:
                    flat[:min(n, s0 - off)] = buf[off:min(off + n, s0)]
                if off + n > s1:
                    lo = max(s1, off)
                    flat[lo - off:] = buf[lo:off + n]
        self.step_count = t
        self._gstate = dict(new_gs)
        self.last_timings = {"reduce": t1 - t0, "stats": t2 - t1, "update": t3 - t2,
                             "allgather": clock() - t3}
        return StepInfo(skipped=False, _grad_norm=gnorm, _group_norms=(gnorm,),
                        group_state=(dict(new_gs),))

    def _reduce(self, arrays, L, send, recv, scratch):
        if arrays is not None:  # None: this rank's input was bad, its sum is thrown away
            for i, off in zip(L.tensors, L.offsets):
                send[off:off + arrays[i].size] = _flat(arrays[i])
        self.comm.sum_shard(send, recv, scratch, L.starts, L.counts, self.sum_order)
        if self.world > 1:  # x / 1 == x: W = 1 skips a pass
            recv /= self.world  # the average in the grads' dtype, as (g_0 + ... + g_{W-1}) / W

    def _param_norms(self, partial):
        rows = self.comm.allgather_rows(partial)
        total = rows[0].copy()
        for k in range(1, self.world):
            total += rows[k]
        return total

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """This rank's shard: copies of its flat state slices, the step count, the options."""
        return {
            "format": "fastopt-shard", "rule": self.rule.name, "rank": self.rank,
            "world": self.world, "step_count": self.step_count,
            "hyperparameters": copy.deepcopy(self.hp), "group_state": dict(self._gstate),
            "layout": [{"dtype": str(L.dtype), "total": L.total, "start": L.starts[self.rank],
                        "count": L.counts[self.rank],
                        "precision": None if L.precision is None else repr(L.precision)}
                       for L in self.layouts],
            "state": [{n: a.copy() for n, a in st.items()} for st in self._state],
        }

    def load_state_dict(self, sd: dict) -> None:
        """Load this rank's ``state_dict()`` (same rule, world size and layout); collective."""
        err = None
        try:
            self._check_shard_dict(sd)
        except (TypeError, ValueError, KeyError) as e:
            err = e if not isinstance(e, KeyError) else ValueError(f"state_dict: missing key {e}")
        self._agree(err)
        self.hp = {**self.hp, **copy.deepcopy(sd["hyperparameters"])}
        self._init_state()
        for st, theirs in zip(self._state, sd["state"]):
            for n, a in st.items():
                a[...] = theirs[n]
        self.step_count = int(sd["step_count"])
        self._gstate = {k: float(v) for k, v in sd["group_state"].items()}

    def _check_shard_dict(self, sd):
        if not isinstance(sd, dict) or sd.get("format") != "fastopt-shard":
            raise TypeError("state_dict: expected a dict from ShardedOptimizer.state_dict() "
                            "(use load_full_state_dict for a single-process one)")
        if sd["rule"] != self.rule.name:
            raise ValueError(f"state_dict['rule']: expected {self.rule.name!r}, got {sd['rule']!r}")
        if (sd["rank"], sd["world"]) != (self.rank, self.world):
            raise ValueError(f"state_dict: expected the shard of rank {self.rank} of {self.world}, "
                             f"got rank {sd['rank']} of {sd['world']}")
        mine = self.state_dict()["layout"]
        if sd["layout"] != mine:
            raise ValueError(f"state_dict['layout']: expected {mine}, got {sd['layout']}")
        hp = {**self.hp, **sd["hyperparameters"]}
        if set(hp) != set(self.hp):
            raise ValueError(f"state_dict['hyperparameters']: unknown option(s) "
                             f"{sorted(set(hp) - set(self.hp))}")
        check_hyperparameters(self.rule, hp, "state_dict['hyperparameters']: ")
        self._check_precision_hp(hp)
        sc = sd["step_count"]
        if isinstance(sc, bool) or not isinstance(sc, (int, np.integer)) or sc < 0:
            raise ValueError(f"state_dict['step_count']: expected an integer >= 0, got {sc!r}")
        if set(sd["group_state"]) != set(self.rule.group_state):
            raise ValueError(f"state_dict['group_state']: expected keys {sorted(self.rule.group_state)}, "
                             f"got {sorted(sd['group_state'])}")
        for k, (tmpl, st) in enumerate(zip(self._state_template(hp), sd["state"])):
            for n, (dt, length, _, _) in tmpl.items():
                a = st.get(n)
                where = f"state_dict['state'][{k}][{n!r}]"
                if not isinstance(a, np.ndarray):
                    raise ValueError(f"{where}: expected an array, got {type(a).__name__}")
                if a.shape != (length,) or a.dtype != dt:
                    raise ValueError(f"{where}: expected {dt} ({length},), got "
                                     f"{a.dtype} {a.shape}")

    def gather_state_dict(self, root: int = 0):
        """The single-process ``state_dict`` of the whole state, on ``root`` (None elsewhere).

        It loads into ``rule(params, ...)`` in one process (``load_state_dict``)
        and is what :meth:`save` writes.  Collective.
        """
        full = {}
        for k, L in enumerate(self.layouts):
            for n, a in self._state[k].items():
                u = self._unit(n)
                buf = np.empty(L.total // u, a.dtype) if self.rank == root else None
                self.comm.gather_shards(a, buf, [x // u for x in L.starts],
                                        [x // u for x in L.counts], root)
                full[(k, n)] = buf
        if self.rank != root:
            return None
        state = {i: {} for i in range(self._n)}
        maps = {}
        for k, L in enumerate(self.layouts):
            for n in self._state[k]:
                buf, u = full[(k, n)], self._unit(n)
                for i, off in zip(L.tensors, L.offsets):
                    p = self.params[i]
                    if u > 1:  # absmax: one per block of the param (offsets are block-aligned)
                        state[i][n] = buf[off // u:off // u + -(-p.size // u)].copy()
                    else:
                        state[i][n] = buf[off:off + p.size].reshape(p.shape).copy()
                if L.q8 and n != "master" and not n.endswith("_absmax"):
                    maps[n] = MAP_NAMES[n not in self.rule.nonnegative_state]
        group = {k: copy.deepcopy(v) for k, v in self.hp.items()}
        group["params"] = list(range(self._n))
        out = {"rule": self.rule.name, "step_count": self.step_count, "param_groups": [group],
               "state": state, "group_state": [dict(self._gstate)],
               "precision": precision_record(self.precision_options)}
        if maps:
            out["q8"] = {"blocksize": _q.BLOCKSIZE, "maps": dict(sorted(maps.items()))}
        return out

    def _probe(self, params):
        """A single-process optimizer of the same rule and options over ``params``."""
        opts = {**self._options, "backend": self.backend}
        return self._cls(params, **opts)

    def load_full_state_dict(self, sd, root: int = 0) -> None:
        """Scatter a single-process ``state_dict`` (given on ``root``) onto the ranks; collective.

        ``sd`` is checked on ``root`` by loading it into a single-process
        optimizer of the same rule over copies of the params; if it does not
        fit, every rank raises and nothing changes.
        """
        err, full = None, None
        if self.rank == root:
            try:
                probe = self._probe([p.copy() for p in self.params])
                probe.load_state_dict(sd)
                full = probe.state_dict()
            except (TypeError, ValueError) as e:
                err = e
        self._agree(err)
        self._scatter_full(full, root)

    def _scatter_full(self, full, root):
        meta = None
        if self.rank == root:
            hp = {k: v for k, v in full["param_groups"][0].items() if k != "params"}
            meta = (hp, int(full["step_count"]), dict(full["group_state"][0]))
        hp, step_count, gstate = self.comm.bcast_object(meta, root)
        self.hp = hp
        self._init_state()
        for k, L in enumerate(self.layouts):
            for n, shard in self._state[k].items():
                buf, u = None, self._unit(n)
                if self.rank == root:
                    # padding (q8 layouts) as _init_state leaves it: zeros, and the zero code
                    buf = np.zeros(L.total // u, shard.dtype)
                    if shard.dtype == np.uint8:
                        buf[:] = _q.zero_code(n not in self.rule.nonnegative_state)
                    for i, off in zip(L.tensors, L.offsets):
                        a = _flat(full["state"][i][n])
                        buf[off // u:off // u + a.size] = a
                self.comm.scatter_shards(buf, shard, [x // u for x in L.starts],
                                         [x // u for x in L.counts], root)
        self.step_count = step_count
        self._gstate = {k: float(v) for k, v in gstate.items()}

    def save(self, path, *, params: bool = True, root: int = 0) -> None:
        """Write a single-process checkpoint (``fastopt.save`` format) from ``root``; collective.

        ``fastopt.load(rule(params, ...), path)`` reads it in one process, and
        :meth:`load` reads it back onto any number of ranks.
        """
        from ._checkpoint import save as _save

        sd = self.gather_state_dict(root)
        err = None
        if self.rank == root:
            try:
                probe = self._probe(self.params)  # the real params: save reads them, never writes
                probe.load_state_dict(sd)
                _save(probe, path, params=params)
            except (TypeError, ValueError, OSError) as e:
                err = e
        self._agree(err)

    def load(self, path, *, params: bool = True, root: int = 0) -> None:
        """Read a ``fastopt.save`` checkpoint on ``root`` and scatter it (params broadcast); collective."""
        from ._checkpoint import load as _load

        err, full, copies = None, None, None
        if self.rank == root:
            try:
                copies = [p.copy() for p in self.params]
                probe = self._probe(copies)
                _load(probe, path, params=params)
                full = probe.state_dict()
            except (TypeError, ValueError, OSError) as e:
                err = e
        self._agree(err)
        if params:
            for i, p in enumerate(self.params):
                if self.rank == root:
                    p[...] = copies[i]
                self.comm.bcast_array(p, root)
        self._scatter_full(full, root)

    def __repr__(self):
        return (f"ShardedOptimizer({self._cls.__name__}, {self._n} params, rank {self.rank} of "
                f"{self.world}, state {self.state_nbytes()} bytes on this rank)")


__all__ = ["ShardedOptimizer", "MPIComm", "TorchComm", "shard_ranges"]
