"""``fastopt.torch``: drop-in ``torch.optim`` optimizers that run fastopt's kernels, zero-copy.

Change one line of a PyTorch training loop::

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)          # before
    opt = fastopt.torch.Adam(model.parameters(), lr=1e-3)        # after

Each class is a :class:`torch.optim.Optimizer` subclass built as torch's is
(``model.parameters()`` or param-group dicts), with torch's option names and
defaults plus fastopt's pipeline options (``clip_value``, ``clip_norm``,
``clip_global_norm``, ``weight_clip``, ``max_norm``, ``nonfinite``).
``step(closure=None)`` reads ``p.grad``; params whose grad is None are skipped,
as torch skips them; sparse grads are an error.  ``zero_grad``,
``add_param_group``, step hooks, ``torch.optim.lr_scheduler`` (``group["lr"]``
is read every step) and ``torch.amp.GradScaler`` work as with torch's own
optimizers.

How the data reaches the kernels
--------------------------------
CPU tensors are handed to the NumPy/Numba backends as NumPy views of the
tensors' own memory (``Tensor.numpy()``): nothing is copied, params and state
are written in place.  State lives in torch tensors in ``optimizer.state[p]``
under torch's names (``exp_avg``, ``exp_avg_sq``, ``step``, ...), so
``state_dict()`` of a ``torch.optim.Adam`` loads into ``fastopt.torch.Adam`` and
back.  The views of params and state are built once and reused while the params
with a grad, their storage and their state tensors stay the same objects; only
the grads (new tensors after ``zero_grad()``) are wrapped every step.

Step counts are per param, as in torch: a param that had no grad for a while,
or a param group added mid-run, keeps its own ``step`` and bias correction.
Params at different step counts are stepped in one pipeline call (one
non-finite decision for the whole step), one fused kernel call per step count.

Loss scaling: ``torch.amp.GradScaler`` sees ``_step_supports_amp_scaling`` and
hands the optimizer its scale and its inf flag, as it does for torch's fused
optimizers: a step with an inf is skipped (params, state and step counts
untouched) and otherwise the grads are unscaled inside the fused kernel (no
separate pass writes them).  Without a scaler, ``step(grad_scale=S)`` divides
the grads by ``S`` in the kernel, and ``nonfinite`` decides what an inf does.

16-bit params
-------------
float16 and bfloat16 params are stepped as the raw API steps them
(docs/design.md, "Precision"): arithmetic in float32, one rounding per write.
A bfloat16 tensor reaches NumPy as an int16 view of its memory re-typed as
``ml_dtypes.bfloat16`` (still no copy).  The optimizer-wide options
``state_dtype`` (None: float32 moments for 16-bit params; ``"param"``: the
param's dtype, as torch.optim keeps them; ``"bfloat16"``), ``master_weights``
(a float32 copy of each 16-bit param in ``state[p]["master"]``; the param is
its round-to-nearest-even), ``stochastic_rounding`` (bfloat16 params without
master weights) and ``seed`` (of the rounding's counter hash, whose step is the
param's own ``step``) are passed through to fastopt's kernels.

8-bit state
-----------
``state_dtype="q8"`` keeps each moment of a param with at least ``min_8bit_size``
elements (4096, bitsandbytes' default) as fastopt's raw API does (docs/design.md,
"8-bit state"): uint8 codes shaped like the param in ``state[p]["<name>_codes"]`` and
one float32 absmax per 256-element block in ``state[p]["<name>_absmax"]``
(``exp_avg_codes``, ``exp_avg_absmax``, ``exp_avg_sq_codes``, ...).  "absmax" is
bitsandbytes' word for the block scale; the stem is torch's state name (bitsandbytes'
``state1``/``state2`` do not say which moment is which), and the codes never sit under
torch's own name, so torch.optim can never read codes as moment values.  Smaller
tensors keep float32 moments under torch's names.  The kernels get NumPy views of these
tensors (zero-copy, as for float state); ``state_dict()`` adds ``"q8": {"blocksize",
"maps"}`` (the raw API's record); ``load_state_dict(sd, convert=True)`` quantizes a
float state (torch.optim's) into codes, or decodes codes into float moments, and
without ``convert`` a state of the other format is an error.  ``state_nbytes()`` counts
the state tensors' bytes.

Not yet here: CUDA tensors raise a ``TypeError`` (the DLPack-to-CuPy path has
not been written); use torch.optim for those.

``import fastopt`` never imports this module (nor torch); importing it without
PyTorch installed raises an ``ImportError`` that says how to install it.
"""

from __future__ import annotations

try:
    import torch
except ImportError as _e:  # pragma: no cover - exercised in a subprocess test
    raise ImportError("fastopt.torch needs PyTorch, which is not installed: "
                      "pip install 'fastopt[torch]' (or install torch as pytorch.org says); "
                      "the rest of fastopt works without it") from _e

import dataclasses
import functools
import itertools
import operator

import numpy as np
from torch.optim import optimizer as _torch_optimizer

from . import _backend
from . import precision as _prec
from . import quantization as _q
from ._pipeline import GroupStep, make_buckets, run_step
from ._rules import (PIPELINE_DEFAULTS, RULES, Rule, as_host_scalars, check_hyperparameters)
from ._state import MAP_NAMES, check_values
from ._validate import (_float32_state, check_grad_scale, check_min_8bit_size, check_nonfinite,
                        check_q8_options, resolve_precisions)

__all__ = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adadelta", "Adamax", "NAdam", "RAdam",
           "Lion", "LAMB", "AdaHessian", "Optimizer", "Muon"]
__all__ += ["ASGD", "Rprop"]
__all__ += ["Adafactor"]

#: torch dtypes the adapter steps, and the NumPy dtype of their zero-copy views (bfloat16:
#: None here, ``ml_dtypes.bfloat16`` -- imported only when a bfloat16 tensor appears --
#: over an int16 view of the tensor, see ``_flat_view``).
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
                 torch.bfloat16: None}
#: NumPy dtype names -> torch dtypes (state dtypes chosen by fastopt.precision)
_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}

#: Group state whose start value torch takes from the options: ASGD's ``eta`` starts at ``lr``
#: (the other names start at ``Rule.group_state``'s value, NAdam's ``mu_product`` at 1).
_GROUP_STATE_START = {"eta": lambda hp: hp["lr"]}

#: torch.optim constructor options that have no effect here: fastopt's step is always one
#: fused, multi-tensor kernel pass, so ``foreach``/``fused`` are accepted and ignored.
_IGNORED_TORCH_OPTIONS = ("foreach", "fused")


def _numpy_dtype(dt):
    """The NumPy dtype of a torch dtype's zero-copy view (bfloat16: imports ml_dtypes now)."""
    return _prec.bfloat16_dtype() if dt == torch.bfloat16 else np.dtype(_NUMPY_DTYPES[dt])


def _scalar_dtype():
    # torch.optim keeps ``step`` as a float tensor of this dtype (torch.optim.optimizer)
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _check_tensor(p, label: str) -> None:
    """TypeError/ValueError unless ``p`` is a dense, contiguous float CPU tensor fastopt steps."""
    if p.dtype not in _NUMPY_DTYPES:
        raise TypeError(f"{label}: expected a float32, float64, float16 or bfloat16 tensor, "
                        f"got {p.dtype}")
    if p.layout != torch.strided:
        raise TypeError(f"{label}: expected a dense (strided) tensor, got layout {p.layout}")
    if p.device.type != "cpu":
        raise TypeError(f"{label}: expected a CPU tensor, got one on {p.device}: fastopt.torch "
                        "runs CPU tensors only so far (the CUDA path through DLPack is not "
                        "written yet); use torch.optim for GPU training")
    if not p.is_contiguous():
        raise ValueError(f"{label}: expected a contiguous tensor (fastopt updates it in place "
                         f"through a flat view), got strides {p.stride()} for shape "
                         f"{tuple(p.shape)}")


def _flat_view(t):
    """A flat NumPy view of a contiguous CPU tensor's memory (no copy).

    NumPy has no bfloat16 of its own and ``Tensor.numpy()`` refuses one, so a
    bfloat16 tensor is viewed as int16 (same bits, same memory) and the NumPy
    array re-typed as ``ml_dtypes.bfloat16``.
    """
    if t.requires_grad:
        t = t.detach()
    if t.dtype == torch.bfloat16:
        a = t.view(torch.int16).numpy().view(_prec.bfloat16_dtype())
    else:
        a = t.numpy()
    return a if a.ndim == 1 else a.reshape(-1)


def _number(v):
    """A Python float for a torch/NumPy scalar hyperparameter (torch allows a tensor lr)."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"expected a scalar, got a tensor of shape {tuple(v.shape)}")
        return float(v.item())
    return v


def _host_hp(group: dict) -> dict:
    hp = {}
    for k, v in group.items():
        if k == "params":
            continue
        if isinstance(v, torch.Tensor):
            v = _number(v)
        elif isinstance(v, tuple) and any(isinstance(x, torch.Tensor) for x in v):
            v = tuple(_number(x) for x in v)
        hp[k] = v
    return as_host_scalars(hp)



def _step_hooks(func):
    """torch.optim.Optimizer's step wrapper, with its profiler range only while a profiler runs.

    torch wraps every optimizer's ``step`` in ``profile_hook_step``: the global and
    per-optimizer pre/post step hooks, and a ``record_function`` range opened on every
    call.  The range alone cost more than the adapter's whole step on the development
    machine (about as much as the raw API's step for 10 small tensors), so this wrapper
    runs the same hooks in the same order and opens the range -- through torch's own
    wrapper -- only when ``torch.autograd._profiler_enabled()``.  ``hooked`` tells
    ``Optimizer._patch_step_function`` that the step is wrapped already.
    """
    profiled = torch.optim.Optimizer.profile_hook_step(func)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if torch.autograd._profiler_enabled():
            return profiled(*args, **kwargs)
        self = args[0]
        pre_global, pre_own = (_torch_optimizer._global_optimizer_pre_hooks,
                               self._optimizer_step_pre_hooks)
        post_own, post_global = (self._optimizer_step_post_hooks,
                                 _torch_optimizer._global_optimizer_post_hooks)
        if not (pre_global or pre_own or post_own or post_global):  # the usual case: no hooks
            out = func(*args, **kwargs)
            self._optimizer_step_code()
            return out
        for pre_hook in itertools.chain(pre_global.values(), pre_own.values()):
            result = pre_hook(self, args, kwargs)
            if result is not None:
                if isinstance(result, tuple) and len(result) == 2:
                    args, kwargs = result
                else:
                    raise RuntimeError(f"{func} must return None or a tuple of (new_args, "
                                       f"new_kwargs), but got {result}.")
        out = func(*args, **kwargs)
        self._optimizer_step_code()
        for post_hook in itertools.chain(post_own.values(), post_global.values()):
            post_hook(self, args, kwargs)
        return out

    wrapper.hooked = True
    return wrapper


class _DtypeOnly:
    """What ``resolve_precisions`` reads of a param: its (NumPy) dtype."""

    def __init__(self, dtype):
        self.dtype = dtype


@dataclasses.dataclass
class _Part:
    """Params of one group at one step count: the views the kernels get, built once."""

    t: int                       # the step count *before* this step
    params: list                 # torch params (AdaHessian finds their extra input by id)
    buckets: list                # make_buckets(...) of the flat views of params and state
    steps: list                  # 0-d NumPy views of the ``step`` tensors (empty for SGD)
    gviews: dict                 # group-state name -> 0-d NumPy views of its per-param tensors
    gstate: dict                 # the rule's group state (NAdam: mu_product; ASGD: eta, mu)
    pos: list | None             # positions among the group's params with a grad (None: all)
    layout: list                 # (dtype, size) of each param's flat view: its grad's too


@dataclasses.dataclass
class _Plan:
    key: tuple                   # ids of the params with a grad, per group
    parts: list                  # per group: list of _Part
    params: list                 # every param of the parts, and their data pointers:
    ptrs: list                   #   storage that must not have moved (module.to())
    st_dicts: list               # (state dict, name, tensor) in three lists: state that
    st_names: list               #   must not have been replaced by hand
    st_tensors: list
    state: dict                  # ``self.state`` and its values (the param state dicts), in
    st_of: list                  #   order: a state dict replaced whole by hand must not leave
                                 #   stale views (compared without hashing a tensor: torch's
                                 #   ``Tensor.__hash__`` is a Python function)
    vals: list                   # per group: the option values last checked (None: a tensor
    hp: list                     #   among them, check every step); their host scalars
    fast: tuple | None = None    # (hp, key, (step plan, grad layout) or None): _fast_step's


def _cacheable(vals):
    """``vals`` to compare with next step's; None when a tensor among them can change in place."""
    for v in vals:
        if isinstance(v, torch.Tensor) or (isinstance(v, tuple) and any(
                isinstance(x, torch.Tensor) for x in v)):
            return None
    return vals


_data_ptr = torch.Tensor.data_ptr
_NONES = itertools.repeat(None)
#: what the fast step compares of each grad with its param's, one C-level ``map`` per property
#: (a Python function per grad cost about as much again): dtype, shape and device here; C
#: contiguity and torch's lazy negation (``torch._neg_view``: its memory holds -g) below.  A
#: grad of another layout (sparse, mkldnn) either fails these or has no data pointer
#: (``data_ptr()`` raises), so the fast step never reads it.
_GRAD_META = operator.attrgetter("dtype", "shape", "is_cpu")
_is_contiguous = torch.Tensor.is_contiguous
_is_neg = torch.Tensor.is_neg


def _grad_view(g):
    """A flat NumPy view of a grad (a contiguous copy if it is not contiguous: it is only read)."""
    try:
        if g.dtype == torch.bfloat16:  # see _flat_view
            a = g.view(torch.int16).numpy().view(_prec.bfloat16_dtype())
        else:
            a = g.numpy()
    except (RuntimeError, TypeError):
        if g.layout != torch.strided:
            raise RuntimeError(f"sparse gradients are not supported (got layout {g.layout}); "
                               "use torch.optim.SparseAdam or a dense embedding") from None
        if g.is_neg():  # torch's lazy negation (its memory holds -g): read a resolved copy
            g = g.resolve_neg()
        a = _flat_view(g)  # a grad that requires grad (create_graph=True)
    if a.ndim != 1:
        return a.reshape(-1)  # a copy when the grad is not C-contiguous
    if a.strides[0] != a.itemsize and a.size > 1:
        return np.ascontiguousarray(a)
    return a


class Optimizer(torch.optim.Optimizer):
    """Base class of the fastopt.torch optimizers (see the module docstring).

    ``nonfinite`` ('raise' | 'skip' | 'ignore') is optimizer-wide: a step is
    atomic across every group (under a GradScaler its inf flag decides).
    ``backend`` is 'auto' (Numba when it imports, else NumPy), 'numba' or 'numpy'.
    """

    rule: Rule = None  # set by each subclass
    # GradScaler hands over its scale and inf flag instead of unscaling the grads itself
    _step_supports_amp_scaling = True

    def __init__(self, params, options: dict, *, nonfinite="raise", backend="auto",
                 state_dtype=None, master_weights=False, stochastic_rounding=False, seed=0,
                 min_8bit_size=4096, torch_only=None):
        rule = self.rule
        for name, value in (torch_only or {}).items():
            if name in _IGNORED_TORCH_OPTIONS:
                continue
            if name == "decoupled_weight_decay":
                if value:
                    raise ValueError(f"decoupled_weight_decay: {type(self).__name__} has L2 "
                                     "weight decay; for decoupled decay use fastopt.torch.AdamW "
                                     f"(Adam), or set weight_decay=0, got {value!r}")
            elif value:  # capturable, differentiable
                raise ValueError(f"{name}: expected False (fastopt's kernels are neither "
                                 f"CUDA-graph capturable nor differentiable), got {value!r}")
        defaults = {**rule.defaults, **PIPELINE_DEFAULTS, **options}
        check_hyperparameters(rule, _host_hp(defaults))
        self.nonfinite = check_nonfinite(nonfinite)
        if backend not in ("auto", "numba", "numpy"):
            raise ValueError(f"backend: expected 'auto', 'numba' or 'numpy' (CPU tensors), "
                             f"got {backend!r}")
        self._backend_asked = backend
        self.precision_options = {"state_dtype": state_dtype, "master_weights": master_weights,
                                  "stochastic_rounding": stochastic_rounding, "seed": seed,
                                  "min_8bit_size": min_8bit_size}
        self.min_8bit_size = check_min_8bit_size(min_8bit_size)
        self._precisions = {}
        self.backend = _backend.resolve(backend, "numpy")
        self._plan = None
        super().__init__(params, defaults)  # runs add_param_group, which resolves precisions

    def _resolve_precisions(self) -> None:
        """Every precision check for the current params, then the backend that takes them.

        ``self._precisions`` maps each torch dtype among the params to its
        resolved ``fastopt.precision.Precision`` (the raw API's checks and
        messages: ``master_weights`` needs 16-bit params, ``stochastic_rounding``
        bfloat16 ones, ...).  Raises before anything is written.
        """
        params, labels = [], []
        multi = len(self.param_groups) > 1
        for gi, g in enumerate(self.param_groups):
            for pi, p in enumerate(g["params"]):
                params.append(p)
                labels.append(f"param_groups[{gi}]['params'][{pi}]" if multi else f"params[{pi}]")
        firsts = {}
        for p, lab in zip(params, labels):
            if p.dtype in _NUMPY_DTYPES:  # others: _check_tensor's TypeError when they get a grad
                firsts.setdefault(p.dtype, (p, lab))
        views = [_DtypeOnly(_numpy_dtype(dt)) for dt in firsts]
        by_np = resolve_precisions(self.rule, views, [lab for _, lab in firsts.values()],
                                   self.precision_options)
        precs = {dt: by_np[v.dtype] for dt, v in zip(firsts, views)}
        for dt, pr in precs.items():
            if not isinstance(pr.state, np.dtype) and pr.state is not _prec.Q8:
                raise NotImplementedError(
                    f"state_dtype: {self.precision_options['state_dtype']!r} is not wired into "
                    "fastopt.torch yet (its state is not one torch tensor per state name); use "
                    "the raw fastopt API or state_dtype None, 'param', 'float32' or 'bfloat16'")
        self.backend = _backend.resolve(self._backend_asked, "numpy", tuple(precs.values()))
        self._precisions = precs

    # ------------------------------------------------------------------ groups and state

    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group``, checked: a bad group leaves the optimizer unchanged."""
        n_before = len(self.param_groups)
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        try:
            group = self.param_groups[gi]
            where = f"param_groups[{gi}]: " if gi else ""
            for pi, p in enumerate(group["params"]):
                _check_tensor(p, f"param_groups[{gi}]['params'][{pi}]" if gi else f"params[{pi}]")
            self._check_group(group, where)
            self._resolve_precisions()
        except Exception:
            del self.param_groups[n_before:]
            raise
        self._plan = None

    def _check_group(self, group: dict, where: str) -> dict:
        if self.rule.name in ("adam", "nadam", "radam") and group.get("decoupled_weight_decay"):
            raise ValueError(f"{where}decoupled_weight_decay: fastopt.torch.{type(self).__name__} "
                             "has L2 weight decay; use AdamW for decoupled decay")
        try:
            hp = _host_hp(group)
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None
        check_hyperparameters(self.rule, hp, where)
        if self.precision_options["state_dtype"] == "q8":
            check_q8_options(self.rule, hp, where)  # a variant 8-bit state cannot take
        return hp

    # ------------------------------------------------------------------ 8-bit state

    def _prec_of(self, p):
        """The resolved precision of one param: its dtype's, except that with
        ``state_dtype="q8"`` a tensor below ``min_8bit_size`` elements keeps float32 state
        (bitsandbytes' rule, as the raw API's ``fastopt._validate.param_precision``)."""
        prec = self._precisions[p.dtype]
        if prec.state is _prec.Q8 and p.numel() < self.min_8bit_size:
            return _float32_state(prec)
        return prec

    def _is_q8(self, p) -> bool:
        return self._prec_of(p).state is _prec.Q8

    def _signed(self, name: str) -> bool:
        return name not in self.rule.nonnegative_state

    def state_nbytes(self) -> int:
        """Bytes of optimizer state: every state tensor of every param (``master`` included),
        in its dtype; 0-d counters (``step``, ``mu_product``, ...) are not counted, as the
        raw API keeps them outside its arrays.  An 8-bit state counts its codes (1 byte per
        element) and its absmax (4 bytes per 256-element block): Adam's moments cost 8 bytes
        per param in float32, about 2.03 with ``state_dtype="q8"``."""
        return sum(int(v.numel()) * v.element_size() for st in self.state.values()
                   for v in st.values() if isinstance(v, torch.Tensor) and v.ndim)

    def state_dict(self) -> dict:
        """torch's ``state_dict``, plus ``"q8": {"blocksize": 256, "maps": {name: map}}`` when
        a state is 8-bit (``<name>_codes`` and ``<name>_absmax`` in a param's state), the
        record the raw API's state dicts carry; torch.optim ignores the extra key."""
        sd = super().state_dict()
        maps = {}
        for st in self.state.values():
            for k in st:
                if k.endswith("_codes"):
                    name = k[:-len("_codes")]
                    maps[name] = MAP_NAMES[self._signed(name)]
        if maps:
            sd["q8"] = {"blocksize": _q.BLOCKSIZE, "maps": dict(sorted(maps.items()))}
        return sd

    def load_state_dict(self, state_dict: dict, *, convert: bool = False) -> None:
        """torch's ``load_state_dict`` (a torch.optim state loads too), checked before it writes.

        Options a torch.optim state does not carry (fastopt's pipeline options,
        ``bias_correction``) take this optimizer's defaults.  A state whose format is
        not this optimizer's -- float moments (a torch.optim state) where a param keeps
        8-bit state (``state_dtype="q8"``), or 8-bit codes where it keeps float state --
        is refused unless ``convert=True``, which quantizes (or decodes: ``map[code] *
        absmax``) each such moment explicitly, as the raw API's ``convert=True`` does.
        Tensors keep the dtype they were saved in (torch's own loader would cast 8-bit
        codes, absmax and float32 moments of 16-bit params to the param's dtype).
        """
        if not isinstance(convert, bool):
            raise TypeError(f"convert: expected True or False, got {type(convert).__name__}")
        state_dict = self._check_loadable(state_dict, convert)
        super().load_state_dict(state_dict)
        # undo torch's cast of every floating state tensor to its param's dtype
        saved = [k for g in state_dict["param_groups"] for k in g["params"]]
        mine = [p for g in self.param_groups for p in g["params"]]
        for key, p in zip(saved, mine):
            theirs = state_dict["state"].get(key)
            if theirs is None or p not in self.state:
                continue
            st = self.state[p]
            for k, v in theirs.items():
                if isinstance(v, torch.Tensor) and k in st and st[k].dtype != v.dtype:
                    st[k] = v.detach().to(device=p.device, copy=True)
        for g in self.param_groups:
            for k, v in self.defaults.items():
                g.setdefault(k, v)
        self._plan = None

    def _load_moment(self, sd, st, n, p, where, convert):
        """Check one moment ``n`` of a loaded param state; ``{key: tensor}`` to replace it with
        (empty: keep it as it is), converted to this optimizer's format when ``convert``."""
        mine_q8 = self._is_q8(p)
        signed = self._signed(n)
        codes, absmax, a = st.get(n + "_codes"), st.get(n + "_absmax"), st.get(n)
        if codes is not None or absmax is not None:
            meta = sd.get("q8")
            if (not isinstance(meta, dict) or meta.get("blocksize") != _q.BLOCKSIZE
                    or not isinstance(meta.get("maps"), dict)):
                raise ValueError(f"state_dict['q8']: expected {{'blocksize': {_q.BLOCKSIZE}, "
                                 "'maps': {state name: map name}} (the record of its 8-bit "
                                 f"states), got {meta!r:.200}")
            if meta["maps"].get(n) != MAP_NAMES[signed]:
                raise ValueError(f"state_dict['q8']['maps'][{n!r}]: expected "
                                 f"{MAP_NAMES[signed]!r}, got {meta['maps'].get(n)!r}")
            nb = -(-p.numel() // _q.BLOCKSIZE)
            if (not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8
                    or codes.shape != p.shape):
                raise ValueError(f"{where}{n + '_codes'!r}]: expected uint8 codes of shape "
                                 f"{tuple(p.shape)} (like its param), got "
                                 f"{getattr(codes, 'dtype', type(codes).__name__)} "
                                 f"{tuple(getattr(codes, 'shape', ()))}")
            if (not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32
                    or tuple(absmax.shape) != (nb,)):
                raise ValueError(f"{where}{n + '_absmax'!r}]: expected float32 of shape ({nb},) "
                                 f"(one per {_q.BLOCKSIZE}-element block), got "
                                 f"{getattr(absmax, 'dtype', type(absmax).__name__)} "
                                 f"{tuple(getattr(absmax, 'shape', ()))}")
            check_values(absmax.detach().cpu().numpy(), f"{where}{n + '_absmax'!r}]", True)
            if mine_q8:
                return {}
            if not convert:
                raise ValueError(f"{where}{n + '_codes'!r}]: this optimizer keeps the param's "
                                 f"{n!r} unquantized, got an 8-bit state (codes + absmax); pass "
                                 "convert=True to decode it")
            values = _q.dequantize_blockwise(codes.detach().cpu().numpy(),
                                             absmax.detach().cpu().numpy(), signed=signed)
            return {n: torch.from_numpy(np.asarray(values, np.float32)).to(p.device),
                    n + "_codes": None, n + "_absmax": None}
        if a is None:
            return None
        shape = tuple(a.shape) if hasattr(a, "shape") else None
        if shape != tuple(p.shape):
            raise ValueError(f"{where}{n!r}]: expected shape {tuple(p.shape)} (like its param), "
                             f"got {shape}")
        if not mine_q8:
            return {}
        if not convert:
            raise ValueError(f"{where}{n!r}]: this optimizer keeps the param's {n!r} 8-bit "
                             f"(state_dtype='q8': {n + '_codes'!r} and {n + '_absmax'!r}), got "
                             f"a {a.dtype} tensor; pass convert=True to quantize it")
        host = a.detach().to(torch.float32).cpu().numpy()
        check_values(host, f"{where}{n!r}]", not signed)
        c, m = _q.quantize_blockwise(host, signed=signed)
        return {n: None, n + "_codes": torch.from_numpy(c).to(p.device),
                n + "_absmax": torch.from_numpy(m).to(p.device)}

    def _check_loadable(self, sd, convert=False) -> dict:
        """Check ``sd`` whole; returns it, or a shallow copy with converted moments."""
        if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
            raise ValueError("state_dict: expected a dict with 'state' and 'param_groups', got "
                             f"{type(sd).__name__} {sorted(sd) if isinstance(sd, dict) else ''}")
        groups = sd["param_groups"]
        converted = None
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict['param_groups']: expected {len(self.param_groups)} "
                             f"groups, got {len(groups)}")
        for gi, (mine, theirs) in enumerate(zip(self.param_groups, groups)):
            if len(theirs["params"]) != len(mine["params"]):
                raise ValueError(f"state_dict['param_groups'][{gi}]: expected "
                                 f"{len(mine['params'])} params, got {len(theirs['params'])}")
            merged = {**self.defaults, **{k: v for k, v in theirs.items() if k != "params"}}
            self._check_group(merged, f"state_dict['param_groups'][{gi}]: ")
            names = [n for n, _ in self.rule.state(_host_hp(merged))]
            for key, p in zip(theirs["params"], mine["params"]):
                st = sd["state"].get(key)
                if st is None:
                    continue
                for n in names:
                    want = self.rule.state_shape_of(n, p.shape)
                    if want is None:
                        continue  # Adafactor: no row_var for a vector, no variance for a matrix
                    where = f"state_dict['state'][{key}]["
                    if want != tuple(p.shape):  # a factored (never 8-bit) state: check its shape
                        a = st.get(n)
                        shape = tuple(a.shape) if hasattr(a, "shape") else None
                        if shape != want:
                            raise ValueError(f"{where}{n!r}]: expected shape {want} (the {n} of "
                                             f"a param of shape {tuple(p.shape)}), got {shape}")
                        continue
                    new = self._load_moment(sd, st, n, p, where, convert)
                    if new is None:
                        # torch's SGD keeps no momentum buffer before the first step
                        if self.rule.name == "sgd":
                            continue
                        raise ValueError(f"{where}{n!r}]: missing")
                    if new:
                        if converted is None:
                            converted = {**sd, "state": dict(sd["state"])}
                        st = converted["state"][key] = dict(converted["state"][key])
                        for k, v in new.items():
                            if v is None:
                                st.pop(k, None)
                            else:
                                st[k] = v
        return sd if converted is None else converted

    # ------------------------------------------------------------------ the step

    @_step_hooks
    def step(self, closure=None, *, grad_scale=None):
        """One step over every param with a grad; returns the closure's loss (or None).

        ``grad_scale``: divide the grads by it inside the kernel (loss scaling
        without a GradScaler); a step with a non-finite grad then raises, is
        skipped or goes through as ``nonfinite`` says.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        return self._step(loss, grad_scale, None)

    def _step(self, loss, grad_scale, extras):
        nonfinite = self.nonfinite
        # a GradScaler (``_step_supports_amp_scaling``) sets these two attributes
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None:
            if float(found_inf) != 0.0:
                return loss  # the scaler saw an inf: params, state and steps untouched
            nonfinite = "ignore"  # the scaler has just read every grad
            scaler_scale = getattr(self, "grad_scale", None)
            if scaler_scale is not None:
                if grad_scale is not None:
                    raise ValueError("grad_scale: expected None when a GradScaler steps this "
                                     f"optimizer (it passes its own scale), got {grad_scale!r}")
                grad_scale = scaler_scale
        if isinstance(grad_scale, torch.Tensor):
            grad_scale = _number(grad_scale)
        inv_scale = check_grad_scale(grad_scale)
        plan = self._plan
        # (``plan.fast[2]`` None: the backend has no pointer plan for it, 16-bit or q8 state)
        if (extras is None and inv_scale is None and plan is not None and plan.fast is not None
                and plan.fast[2] is not None and self._fast_step(plan, None, nonfinite)):
            return loss  # the cached plan checked as current in one pass (see _fast_step)

        # one pass over p.grad: the grads of this step and the key of the cached plan
        grads_of = [[p.grad for p in g["params"]] for g in self.param_groups]
        plan = self._current_plan(grads_of)
        if plan is None:
            return loss  # no param has a grad
        if extras is None and inv_scale is None and self._fast_step(plan, grads_of[0], nonfinite):
            return loss
        steps = []
        for gi, parts in enumerate(plan.parts):
            present = [x for x in grads_of[gi] if x is not None]
            hp = plan.hp[gi]
            for part in parts:
                grads = [_grad_view(x) for x in (present if part.pos is None
                                                 else [present[i] for i in part.pos])]
                if [(a.dtype, a.size) for a in grads] != part.layout:
                    self._bad_grad(part, grads)
                ex = None if extras is None else [extras[id(p)] for p in part.params]
                # each part at its own step count; the parts of a group share one global norm
                steps.append(GroupStep(hp=hp, buckets=part.buckets, grads=grads, extras=ex,
                                       gstate=part.gstate, t=part.t + 1, norm_group=gi))
        info = run_step(self.backend, self.rule, steps, 0, nonfinite, inv_scale)
        if info.skipped:
            return loss
        k = 0
        for parts in plan.parts:
            for part in parts:
                part.t += 1
                t = float(part.t)
                for v in part.steps:
                    v[()] = t
                part.gstate = dict(info.group_state[k])
                for name, views in part.gviews.items():
                    value = part.gstate[name]
                    for v in views:
                        v[()] = value
                    # the next step reads what torch would: the value in the tensor's dtype
                    part.gstate[name] = float(views[0])
                k += 1
        return loss

    def _fast_step(self, plan, grads, nonfinite) -> bool:
        """The step through the backend's pointer plan (``Ops.step_plan``); False: take the full one.

        Only for one group of params at one step count whose options are plain values
        and whose single bucket the backend plans (float32/float64, an elementwise rule,
        no norm clipping, no ``max_norm``).  Per step it checks that every grad is a
        C-contiguous CPU tensor of its param's dtype and shape, without torch's lazy
        negation (one C-level ``map`` per property), hands the kernels the grads' data
        pointers, and runs the update, checking the grads first unless
        ``nonfinite='ignore'`` (in the same kernel call where the step runs as one part).
        A non-finite grad goes back to the full step, which raises or skips with nothing
        written.  The same kernels run as on the full step, so the results are
        bit-identical (tests/test_torch_fast_step.py).

        ``grads`` None: ``_step`` calls it first with the plan of the previous step and no
        grads read yet.  Then this checks, in one pass, everything ``_current_plan`` checks
        for a plan of one group whose params all have a grad -- the same param objects in
        the group, each with a grad, their data pointers, every state dict and state
        tensor the same objects, the options unchanged (else re-checked, as
        ``_current_plan`` does) -- and reads the grads itself; False at the first
        difference, and the full path decides.
        """
        if len(plan.parts) != 1 or len(plan.parts[0]) != 1 or plan.vals[0] is None:
            return False
        part = plan.parts[0][0]
        if grads is None:
            groups = self.param_groups
            if len(groups) != 1 or part.pos is not None:
                return False
            group = groups[0]
            present = group["params"]
            # (``is`` over the lists stays in C; ``==`` would call Tensor.__eq__)
            if len(present) != len(plan.params) or not all(map(operator.is_, present,
                                                               plan.params)):
                return False
            present = [p.grad for p in present]
            if (any(map(operator.is_, present, _NONES))
                    or list(map(_data_ptr, plan.params)) != plan.ptrs
                    or not self._same_state_dicts(plan)
                    or not all(map(operator.is_, map(dict.get, plan.st_dicts, plan.st_names),
                                   plan.st_tensors))
                    or not self._options_current(plan, 0, group)):
                return False
        else:
            present = [x for x in grads if x is not None]  # (``None in grads``: Tensor.__eq__)
        hp = plan.hp[0]
        fast = plan.fast
        if fast is None or fast[0] is not hp:  # new options were checked (an lr schedule)
            # what the plan's construction reads of the options (its scalars come per step):
            # the pipeline's, and every flag, as flags pick the kernel's variant (nesterov)
            key = (self.backend, hp["weight_clip"], hp["clip_norm"], hp["clip_global_norm"],
                   hp["max_norm"], hp["clip_value"], hp.get("hessian_power"),
                   tuple(sorted((k, v) for k, v in hp.items() if isinstance(v, bool))))
            sp = fast[2] if fast is not None and fast[1] == key else self._pointer_plan(part, hp)
            fast = plan.fast = (hp, key, sp)
        sp = fast[2]
        if sp is None:
            return False
        step_plan, want = sp
        try:
            if (list(map(_GRAD_META, present)) != want or not all(map(_is_contiguous, present))
                    or any(map(_is_neg, present))):
                return False
            # (a grad without storage -- sparse, mkldnn -- raises here)
            ptrs = np.fromiter(map(_data_ptr, present), np.int64, len(present))
        except RuntimeError:  # a sparse grad: the full step says what is wrong
            return False
        step_plan.set_grads(ptrs)
        t = part.t + 1
        s, new_gs = self.rule.step_scalars(hp, t, part.gstate)
        if not step_plan.update(s, check=nonfinite != "ignore"):
            return False  # nothing written: the full step raises or skips
        part.t = t
        t = float(t)
        for v in part.steps:
            v[()] = t
        part.gstate = dict(new_gs)
        for name, views in part.gviews.items():
            value = part.gstate[name]
            for v in views:
                v[()] = value
            part.gstate[name] = float(views[0])
        return True

    def _pointer_plan(self, part, hp):
        """``(StepPlan, the grad layout it accepts)`` for ``part``, or None where the backend
        has none: the step plan of the backend over the part's one bucket, addressing the
        grads through data pointers (the bucket's params stand in for them until the first
        ``set_grads``)."""
        if len(part.buckets) != 1:
            return None
        bucket = part.buckets[0]
        try:
            sp = _backend.get_ops(self.backend).step_plan(
                self.rule, bucket, bucket.params, hp, pointers=True)
        except TypeError:  # a backend whose plans take no pointers
            return None
        if sp is None:
            return None
        return sp, [(p.dtype, p.shape, True) for p in part.params]  # as _GRAD_META reads

    def _bad_grad(self, part, grads):
        for p, a in zip(part.params, grads):
            if a.dtype != _numpy_dtype(p.dtype) or a.size != p.numel():
                raise ValueError(f"the grad of a {p.dtype} param of shape {tuple(p.shape)}: "
                                 f"expected one like it, got {a.dtype} of {a.size} elements "
                                 "(was the param converted after its grad was computed?)")

    def _current_plan(self, grads_of):
        """The cached views, rebuilt when a param, its storage, its state or an option changed.

        Checked every step, at C speed: which params have a grad (their ids), the
        params' data pointers (``module.to()`` swaps storage), the identity of every
        param's state dict and state tensor (either replaced by hand), and the groups'
        option values.  ``_step`` first tries the previous plan without this lookup
        (``_fast_step(plan, None, ...)``, which checks the same things).
        """
        groups = self.param_groups
        # (``None in gl`` would call Tensor.__eq__; ``is`` over the list stays in C)
        key = tuple(tuple(map(id, g["params"])) if not any(map(operator.is_, gl, _NONES))
                    else tuple(id(p) for p, x in zip(g["params"], gl) if x is not None)
                    for g, gl in zip(groups, grads_of))
        plan = self._plan
        if (plan is not None and plan.key == key
                and list(map(_data_ptr, plan.params)) == plan.ptrs
                and self._same_state_dicts(plan)
                and all(map(operator.is_, map(dict.get, plan.st_dicts, plan.st_names),
                            plan.st_tensors))
                and all(self._options_current(plan, gi, g) for gi, g in enumerate(groups))):
            return plan
        if not any(key):
            self._plan = None
            return None
        self._plan = plan = self._build_plan(key)
        return plan

    def _same_state_dicts(self, plan) -> bool:
        """Whether ``self.state`` and every param's state dict in it are the plan's objects
        (any entry replaced, added or removed since the plan was built: False)."""
        state = self.state
        return (state is plan.state and len(state) == len(plan.st_of)
                and all(map(operator.is_, state.values(), plan.st_of)))

    def _options_current(self, plan, gi, group) -> bool:
        """Whether the plan's options of group ``gi`` are ``group``'s: its values as last
        checked, or checked again now and taken into the plan (an lr schedule); False where
        a variant switched (amsgrad, momentum, centered: other state, a new plan)."""
        vals = list(group.values())
        if plan.vals[gi] is not None and vals == plan.vals[gi]:
            return True
        hp = self._check_group(group, self._where(gi))
        if self._names(hp) != self._names(plan.hp[gi]):
            return False
        plan.hp[gi], plan.vals[gi] = hp, _cacheable(vals)
        return True

    def _where(self, gi):
        return f"param_groups[{gi}]: " if len(self.param_groups) > 1 else ""

    def _names(self, hp):
        return tuple(n for n, _ in self.rule.state(hp))

    def _build_plan(self, key) -> _Plan:
        rule = self.rule
        # every check first: a bad param or option must not leave new state behind
        hps, vals = [], []
        for gi, g in enumerate(self.param_groups):
            hps.append(self._check_group(g, self._where(gi)))
            vals.append(_cacheable(list(g.values())))
        with_grad = [set(ids) for ids in key]
        for gi, g in enumerate(self.param_groups):
            for pi, p in enumerate(g["params"]):
                if id(p) not in with_grad[gi]:
                    continue
                label = f"param_groups[{gi}]['params'][{pi}]" if len(self.param_groups) > 1 \
                    else f"params[{pi}]"
                _check_tensor(p, label)
                st = self.state.get(p, {})
                for n in self._names(hps[gi]):
                    a = st.get(n)
                    want = rule.state_shape_of(n, p.shape)
                    if a is not None and want is not None and (
                            not isinstance(a, torch.Tensor) or tuple(a.shape) != want):
                        raise ValueError(f"state[{label}][{n!r}]: expected a tensor of shape "
                                         f"{want}, got {getattr(a, 'shape', a)!r}")
        self._resolve_precisions()  # a param may have changed dtype (module.to(torch.bfloat16))
        if self.precision_options["state_dtype"] == "q8":
            self._check_q8_state(hps, with_grad)
        parts_all, params_all, st_dicts, st_names, st_tensors = [], [], [], [], []
        sdt = _scalar_dtype()
        for gi, g in enumerate(self.param_groups):
            hp = hps[gi]
            names = rule.state(hp)
            by_t = {}
            members = [p for p in g["params"] if id(p) in with_grad[gi]]
            for pos, p in enumerate(members):
                st = self.state[p]  # a defaultdict: creates the entry
                t = self._init_state(p, st, names, hp, sdt)
                if not st:
                    del self.state[p]  # torch keeps no entry for a stateless rule (plain SGD)
                by_t.setdefault(t, []).append((pos, p, st))
            parts = []
            for t, entries in sorted(by_t.items()):
                params = [p for _, p, _ in entries]
                states = [st for _, _, st in entries]
                flat_p = [_flat_view(p) for p in params]
                # an 8-bit moment reaches the kernels as the raw API's: its codes under the
                # moment's name, its absmax under ``<name>_absmax`` (None: a float state);
                # None for a state this param has not (Adafactor's row_var of a vector)
                flat_s = {}
                for n, _ in names:
                    flat_s[n] = [_flat_view(st[n + "_codes"] if n + "_codes" in st else st[n])
                                 if n in st or n + "_codes" in st else None for st in states]
                    absmax = [_flat_view(st[n + "_absmax"]) if n + "_absmax" in st else None
                              for st in states]
                    if any(a is not None for a in absmax):
                        flat_s[n + "_absmax"] = absmax
                if self.precision_options["master_weights"]:
                    flat_s["master"] = [_flat_view(st["master"]) for st in states]
                steps = [st["step"].numpy() for st in states] if "step" in states[0] else []
                # torch keeps the group state per param (NAdam's mu_product, ASGD's eta and
                # mu); params at one step count hold the same values: the first one's are read
                gviews = {k: [st[k].numpy() for st in states] for k in rule.group_state}
                gstate = {k: float(v[0]) for k, v in gviews.items()}
                parts.append(_Part(
                    t=t, params=params, steps=steps,
                    # a rule whose kernel needs the params' shapes (Muon) gets them
                    buckets=make_buckets(flat_p, flat_s,
                                         param_precisions=[self._prec_of(p) for p in params],
                                         shapes=[tuple(p.shape) for p in params]
                                         if rule.needs_shapes else None),
                    gviews=gviews, gstate=gstate,
                    pos=None if len(by_t) == 1 else [pos for pos, _, _ in entries],
                    layout=[(a.dtype, a.size) for a in flat_p]))
                for st in states:
                    for n, v in st.items():
                        if isinstance(v, torch.Tensor):
                            st_dicts.append(st)
                            st_names.append(n)
                            st_tensors.append(v)
                params_all += params
            parts_all.append(parts)
        return _Plan(key=key, parts=parts_all, params=params_all,
                     ptrs=list(map(_data_ptr, params_all)), st_dicts=st_dicts,
                     st_names=st_names, st_tensors=st_tensors,
                     state=self.state, st_of=list(self.state.values()), vals=vals, hp=hps)

    def _check_q8_state(self, hps, with_grad) -> None:
        """ValueError for a param with 8-bit state whose state holds a float moment under torch's
        name (set by hand: ``load_state_dict(..., convert=True)`` converts one) or codes/absmax
        of the wrong dtype or shape.  Nothing is written."""
        multi = len(self.param_groups) > 1
        for gi, g in enumerate(self.param_groups):
            for pi, p in enumerate(g["params"]):
                if id(p) not in with_grad[gi] or not self._is_q8(p) or p not in self.state:
                    continue
                st = self.state[p]
                label = f"param_groups[{gi}]['params'][{pi}]" if multi else f"params[{pi}]"
                nb = -(-p.numel() // _q.BLOCKSIZE)
                for n, _ in self.rule.state(hps[gi]):
                    if n in st:
                        raise ValueError(f"state[{label}][{n!r}]: expected no float {n!r} (the "
                                         f"param keeps it 8-bit, state_dtype='q8', as "
                                         f"{n + '_codes'!r} and {n + '_absmax'!r}), got a "
                                         f"tensor; load a float state with "
                                         f"load_state_dict(sd, convert=True)")
                    for k, dt, shape in ((n + "_codes", torch.uint8, tuple(p.shape)),
                                         (n + "_absmax", torch.float32, (nb,))):
                        a = st.get(k)
                        if a is not None and (not isinstance(a, torch.Tensor) or a.dtype != dt
                                              or tuple(a.shape) != shape):
                            raise ValueError(f"state[{label}][{k!r}]: expected a {dt} tensor of "
                                             f"shape {shape}, got {getattr(a, 'dtype', a)!r} "
                                             f"{tuple(getattr(a, 'shape', ()))}")

    def _init_state(self, p, st, names, hp, sdt) -> int:
        """Create the state arrays ``p`` lacks (torch creates them lazily too); its step count."""
        had_buffer = "momentum_buffer" in st or "momentum_buffer_codes" in st
        prec = self._prec_of(p)
        q8 = prec.state is _prec.Q8
        # the param's dtype unless state_dtype says else (8-bit: the codes' float32 absmax)
        dt = torch.float32 if q8 else _TORCH_DTYPES[prec.state.name]
        for n, init in names:
            if q8:
                c, m = st.get(n + "_codes"), st.get(n + "_absmax")
                if c is None or m is None:
                    # the rule's start value, quantized (0: the zero code, absmax 0)
                    codes, absmax = _q.quantize_blockwise(np.full(tuple(p.shape), init,
                                                                  np.float32),
                                                          signed=self._signed(n))
                    st[n + "_codes"] = torch.from_numpy(np.ascontiguousarray(codes))
                    st[n + "_absmax"] = torch.from_numpy(absmax)
                else:
                    st[n + "_codes"], st[n + "_absmax"] = c.contiguous(), m.contiguous()
                continue
            a = st.get(n)
            shape = self.rule.state_shape_of(n, p.shape)
            if shape is None:
                continue  # this param keeps no such state (Adafactor's factors of a vector)
            if a is None and shape != tuple(p.shape):
                st[n] = torch.full(shape, init, dtype=dt, device=p.device)
            elif a is None:
                st[n] = torch.full_like(p, init, dtype=dt, memory_format=torch.contiguous_format)
            elif a.dtype != dt or not a.is_contiguous() or a.device != p.device:
                st[n] = a.to(dtype=dt, device=p.device).contiguous()
        if prec.master_weights:
            m = st.get("master")
            if m is None or not isinstance(m, torch.Tensor) or m.shape != p.shape:
                # exact: every 16-bit value is a float32 value, and the param is RNE(master)
                st["master"] = p.detach().to(torch.float32, memory_format=torch.contiguous_format)
            elif m.dtype != torch.float32 or not m.is_contiguous():
                st["master"] = m.to(torch.float32).contiguous()
        if self.rule.name == "sgd":
            # torch's SGD counts no steps: its first step is the one without a momentum buffer
            return 1 if had_buffer else 0
        step = st.get("step")
        if step is None:
            st["step"] = torch.zeros((), dtype=sdt)
        elif (not isinstance(step, torch.Tensor) or step.ndim
              or step.dtype not in (torch.float32, torch.float64)):
            st["step"] = torch.tensor(float(step), dtype=sdt)
        for k, start in self.rule.group_state.items():
            if k not in st:
                st[k] = torch.tensor(float(_GROUP_STATE_START.get(k, lambda hp: start)(hp)),
                                     dtype=sdt)
            elif not isinstance(st[k], torch.Tensor):
                st[k] = torch.tensor(float(st[k]), dtype=sdt)
        t = float(st["step"])
        if not (t >= 0 and t == int(t)):
            raise ValueError(f"state 'step': expected a whole number >= 0, got {t}")
        return int(t)


# --------------------------------------------------------------------------- the rules

_TORCH_KW = dict(foreach=None, capturable=False, differentiable=False)


def _split(local: dict, torch_only: tuple):
    """Constructor locals -> (options, fastopt-wide options, torch-only options)."""
    out = {k: v for k, v in local.items() if k not in ("self", "params", "__class__")}
    if isinstance(out.get("betas"), list):
        out["betas"] = tuple(out["betas"])
    wide = {k: out.pop(k) for k in ("nonfinite", "backend", "state_dtype", "master_weights",
                                    "stochastic_rounding", "seed", "min_8bit_size")}
    tonly = {k: out.pop(k) for k in torch_only}
    return out, wide, tonly


_DOC = """

    As ``torch.optim.{torch}`` (same option names and defaults{extra}), running
    fastopt's fused kernel on the params' own memory; see :mod:`fastopt.torch`.
    fastopt's options: ``clip_value``, ``clip_norm`` (per tensor),
    ``clip_global_norm`` (all tensors of a group), ``weight_clip``, ``max_norm``
    (any of them per group), ``nonfinite``, ``backend``, ``state_dtype`` (``"q8"``:
    8-bit moments for tensors of at least ``min_8bit_size`` elements) and, for 16-bit
    params, ``master_weights``, ``stochastic_rounding`` and ``seed``.
"""


class SGD(Optimizer):
    rule = RULES["sgd"]
    __doc__ = "SGD with optional (Nesterov) momentum." + _DOC.format(torch="SGD", extra="")

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, clip_value=None, clip_norm=None, clip_global_norm=None,
                 weight_clip=None, max_norm=None, nonfinite="raise", backend="auto",
                 state_dtype=None, master_weights=False, stochastic_rounding=False, seed=0,
                 min_8bit_size=4096):
        o, w, t = _split(locals(), ("foreach", "differentiable", "fused"))
        super().__init__(params, o, torch_only=t, **w)


class Adam(Optimizer):
    rule = RULES["adam"]
    __doc__ = "Adam with L2 weight decay." + _DOC.format(
        torch="Adam", extra="; ``bias_correction=False`` drops both bias corrections")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 bias_correction=True, clip_value=None, clip_norm=None, clip_global_norm=None,
                 weight_clip=None, max_norm=None, nonfinite="raise", backend="auto",
                 state_dtype=None, master_weights=False, stochastic_rounding=False, seed=0,
                 min_8bit_size=4096):
        o, w, t = _split(locals(), ("foreach", "capturable", "differentiable", "fused",
                                    "decoupled_weight_decay"))
        super().__init__(params, o, torch_only=t, **w)


class AdamW(Optimizer):
    rule = RULES["adamw"]
    __doc__ = "Adam with decoupled weight decay." + _DOC.format(torch="AdamW", extra="")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, bias_correction=True, clip_value=None,
                 clip_norm=None, clip_global_norm=None, weight_clip=None, max_norm=None,
                 nonfinite="raise", backend="auto", state_dtype=None,
                 master_weights=False, stochastic_rounding=False, seed=0,
                 min_8bit_size=4096):
        o, w, t = _split(locals(), ("foreach", "capturable", "differentiable", "fused"))
        super().__init__(params, o, torch_only=t, **w)


class Adagrad(Optimizer):
    rule = RULES["adagrad"]
    __doc__ = "Adagrad." + _DOC.format(torch="Adagrad", extra="")

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, foreach=None, *, maximize=False,
                 differentiable=False, fused=None, clip_value=None, clip_norm=None,
                 clip_global_norm=None, weight_clip=None, max_norm=None, nonfinite="raise",
                 backend="auto", state_dtype=None,
                 master_weights=False, stochastic_rounding=False, seed=0,
                 min_8bit_size=4096):
        o, w, t = _split(locals(), ("foreach", "differentiable", "fused"))
        super().__init__(params, o, torch_only=t, **w)


class RMSprop(Optimizer):
    rule = RULES["rmsprop"]
    __doc__ = "RMSprop (eps outside the square root)." + _DOC.format(torch="RMSprop", extra="")

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False, *, clip_value=None, clip_norm=None, clip_global_norm=None,
                 weight_clip=None, max_norm=None, nonfinite="raise", backend="auto",
                 state_dtype=None, master_weights=False, stochastic_rounding=False, seed=0,
                 min_8bit_size=4096):
        o, w, t = _split(locals(), ("foreach", "capturable", "differentiable"))
        super().__init__(params, o, torch_only=t, **w)


class Adadelta(Optimizer):
    rule = RULES["adadelta"]
    __doc__ = "Adadelta." + _DOC.format(torch="Adadelta", extra="")

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, foreach=None, *,
                 capturable=False, maximize=False, differentiable=False, clip_value=None,
                 clip_norm=None, clip_global_norm=None, weight_clip=None, max_norm=None,
                 nonfinite="raise", backend="auto", state_dtype=None,
                 master_weights=False, stochastic_rounding=False, seed=0,
                 min_8bit_size=4096):
        o, w, t = _split(locals(), ("foreach", "capturable", "differentiable"))
        super().__init__(params, o, torch_only=t, **w)


class Adamax(Optimizer):
    rule = RULES["adamax"]
    __doc__ = "Adamax." + _DOC.format(torch="Adamax", extra="")

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 foreach=None, *, maximize=False, differentiable=False, capturable=False,
                 clip_value=None, clip_norm=None, clip_global_norm=None, weight_clip=None,
                 max_norm=None, nonfinite="raise", backend="auto", state_dtype=None,
                 master_weights=False, stochastic_rounding=False, seed=0,
                 min_8bit_size=4096):
        o, w, t = _split(locals(), ("foreach", "capturable", "differentiable"))
        super().__init__(params, o, torch_only=t, **w)


class NAdam(Optimizer):
    rule = RULES["nadam"]
    __doc__ = "NAdam with torch's momentum_decay schedule." + _DOC.format(
        torch="NAdam", extra="; ``mu_product`` is kept per param, as torch keeps it")

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 momentum_decay=4e-3, decoupled_weight_decay=False, *, foreach=None,
                 maximize=False, capturable=False, differentiable=False, clip_value=None,
                 clip_norm=None, clip_global_norm=None, weight_clip=None, max_norm=None,
                 nonfinite="raise", backend="auto", state_dtype=None,
                 master_weights=False, stochastic_rounding=False, seed=0,
                 min_8bit_size=4096):
        o, w, t = _split(locals(), ("foreach", "capturable", "differentiable",
                                    "decoupled_weight_decay"))
        super().__init__(params, o, torch_only=t, **w)


class RAdam(Optimizer):
    rule = RULES["radam"]
    __doc__ = "Rectified Adam." + _DOC.format(torch="RAdam", extra="")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, clip_value=None, clip_norm=None, clip_global_norm=None,
                 weight_clip=None, max_norm=None, nonfinite="raise", backend="auto",
                 state_dtype=None, master_weights=False, stochastic_rounding=False, seed=0,
                 min_8bit_size=4096):
        o, w, t = _split(locals(), ("foreach", "capturable", "differentiable",
                                    "decoupled_weight_decay"))
        super().__init__(params, o, torch_only=t, **w)


class Lion(Optimizer):
    """Lion (Chen et al., 2023): sign momentum, decoupled decay.  torch has no Lion; the
    options are fastopt's (``lr=1e-4, betas=(0.9, 0.99), weight_decay=0``), state
    ``exp_avg`` and ``step``.  See :mod:`fastopt.torch` for the pipeline options."""

    rule = RULES["lion"]

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False,
                 clip_value=None, clip_norm=None, clip_global_norm=None, weight_clip=None,
                 max_norm=None, nonfinite="raise", backend="auto", state_dtype=None,
                 master_weights=False, stochastic_rounding=False, seed=0,
                 min_8bit_size=4096):
        o, w, t = _split(locals(), ())
        super().__init__(params, o, torch_only=t, **w)


class LAMB(Optimizer):
    """LAMB (You et al.): Adam moments with a per-tensor trust ratio.  torch has no LAMB;
    the options are fastopt's, state ``exp_avg``, ``exp_avg_sq`` and ``step``."""

    rule = RULES["lamb"]

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, *,
                 bias_correction=True, maximize=False, clip_value=None, clip_norm=None,
                 clip_global_norm=None, weight_clip=None, max_norm=None, nonfinite="raise",
                 backend="auto", state_dtype=None,
                 master_weights=False, stochastic_rounding=False, seed=0,
                 min_8bit_size=4096):
        o, w, t = _split(locals(), ())
        super().__init__(params, o, torch_only=t, **w)


class AdaHessian(Optimizer):
    """AdaHessian (Yao et al.): Adam whose second moment is fed by a Hessian-diagonal estimate.

    ``step(closure=None, *, hessian_diags)``: ``hessian_diags`` maps each param
    with a grad to a tensor like it (a dict keyed by the param, or a list in
    ``param_groups`` order with an entry per param; entries of params without a
    grad are ignored).  State ``exp_avg``, ``exp_hessian_diag_sq``, ``step``.
    """

    rule = RULES["adahessian"]

    def __init__(self, params, lr=0.15, betas=(0.9, 0.999), eps=1e-4, hessian_power=1.0,
                 weight_decay=0.0, *, maximize=False, clip_value=None, clip_norm=None,
                 clip_global_norm=None, weight_clip=None, max_norm=None, nonfinite="raise",
                 backend="auto", state_dtype=None,
                 master_weights=False, stochastic_rounding=False, seed=0,
                 min_8bit_size=4096):
        o, w, t = _split(locals(), ())
        super().__init__(params, o, torch_only=t, **w)

    @_step_hooks
    def step(self, closure=None, *, hessian_diags=None, grad_scale=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        all_params = [p for g in self.param_groups for p in g["params"]]
        if hessian_diags is None:
            raise TypeError("AdaHessian.step(): hessian_diags is required (one tensor per param, "
                            "a dict keyed by param or a list in param_groups order)")
        if isinstance(hessian_diags, dict):
            by_id = {id(p): h for p, h in hessian_diags.items()}
        else:
            hessian_diags = list(hessian_diags)
            if len(hessian_diags) != len(all_params):
                raise ValueError(f"hessian_diags: expected {len(all_params)} tensors (one per "
                                 f"param), got {len(hessian_diags)}")
            by_id = {id(p): h for p, h in zip(all_params, hessian_diags)}
        extras = {}
        for i, p in enumerate(all_params):
            if p.grad is None:
                continue
            h = by_id.get(id(p))
            label = f"hessian_diags[{i}]"
            if not isinstance(h, torch.Tensor):
                raise TypeError(f"{label}: expected a tensor like params[{i}], got "
                                f"{type(h).__name__}")
            if h.shape != p.shape or h.dtype != p.dtype or h.device != p.device:
                raise ValueError(f"{label}: expected {p.dtype} {tuple(p.shape)} on {p.device} "
                                 f"(like params[{i}]), got {h.dtype} {tuple(h.shape)} on "
                                 f"{h.device}")
            if h.layout != torch.strided:
                raise TypeError(f"{label}: expected a dense tensor, got layout {h.layout}")
            extras[id(p)] = _flat_view(h.contiguous())
        return self._step(loss, grad_scale, extras)


class Muon(Optimizer):
    rule = RULES["muon"]
    __doc__ = ("Muon: orthogonalized momentum for 2-D (hidden-layer) params." + _DOC.format(
        torch="Muon", extra="; its Newton-Schulz products run in the param's dtype, where torch "
        "runs them in bfloat16; no ``maximize``, as torch") + """
    Give Muon the hidden weight matrices only; biases, norms, embeddings and the output layer
    go to another optimizer (``fastopt.torch.AdamW``), as torch.optim.Muon's docs say.
""")

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5,
                 adjust_lr_fn=None, *, clip_value=None, clip_norm=None, clip_global_norm=None,
                 weight_clip=None, max_norm=None, nonfinite="raise", backend="auto",
                 state_dtype=None, master_weights=False, stochastic_rounding=False, seed=0,
                 min_8bit_size=4096):
        # torch.optim.Muon's own checks and messages first
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 <= momentum:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn is not None and adjust_lr_fn not in ("original", "match_rms_adamw"):
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        o, w, t = _split(locals(), ())
        super().__init__(params, o, torch_only=t, **w)
        for group in self.param_groups:
            for p in group["params"]:
                self._check_matrix(p)

    @staticmethod
    def _check_matrix(p):
        if p.ndim != 2:
            raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter "
                             f"with size: {p.size()}")

    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group``; a group with a param that is not 2-D is refused whole."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if isinstance(p, torch.Tensor):
                self._check_matrix(p)
        super().add_param_group(param_group)


class ASGD(Optimizer):
    rule = RULES["asgd"]
    __doc__ = "Averaged SGD." + _DOC.format(
        torch="ASGD", extra="; ``eta``, ``mu`` and the average ``ax`` are kept per param, as "
        "torch keeps them")

    def __init__(self, params, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0,
                 foreach=None, maximize=False, differentiable=False, capturable=False, *,
                 clip_value=None, clip_norm=None, clip_global_norm=None, weight_clip=None,
                 max_norm=None, nonfinite="raise", backend="auto", state_dtype=None,
                 master_weights=False, stochastic_rounding=False, seed=0,
                 min_8bit_size=4096):
        o, w, t = _split(locals(), ("foreach", "capturable", "differentiable"))
        super().__init__(params, o, torch_only=t, **w)


class Rprop(Optimizer):
    rule = RULES["rprop"]
    __doc__ = "Resilient backpropagation." + _DOC.format(
        torch="Rprop", extra="; the per-element ``step_size`` and ``prev`` are state")

    def __init__(self, params, lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0), *,
                 capturable=False, foreach=None, maximize=False, differentiable=False,
                 clip_value=None, clip_norm=None, clip_global_norm=None, weight_clip=None,
                 max_norm=None, nonfinite="raise", backend="auto", state_dtype=None,
                 master_weights=False, stochastic_rounding=False, seed=0,
                 min_8bit_size=4096):
        o, w, t = _split(locals(), ("foreach", "capturable", "differentiable"))
        for k in ("etas", "step_sizes"):
            if isinstance(o.get(k), list):
                o[k] = tuple(o[k])
        super().__init__(params, o, torch_only=t, **w)


class Adafactor(Optimizer):
    rule = RULES["adafactor"]
    __doc__ = "Adafactor (factored second moments)." + _DOC.format(
        torch="Adafactor", extra="; ``row_var``/``col_var`` (params of two or more dims) and "
        "``variance`` (0-/1-D params) are kept under torch's names and shapes") + """
    ``state_dtype="q8"`` is refused (the factors are not elementwise), and so is a state dtype
    other than the param's for float32/float64 params; float16/bfloat16 params take None
    (float32 factors), ``"param"`` or ``"bfloat16"``.
"""

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                 weight_decay=0.0, *, foreach=None, maximize=False, clip_value=None,
                 clip_norm=None, clip_global_norm=None, weight_clip=None, max_norm=None,
                 nonfinite="raise", backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, min_8bit_size=4096):
        # torch.optim.Adafactor's own checks and messages first
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 >= beta2_decay:
            raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay}")
        if eps[0] is not None and not 0.0 <= eps[0]:
            raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
        if not 0.0 <= eps[1]:
            raise ValueError(f"epsilon2 should be >= 0 but is: {eps[1]}")
        if not 1.0 <= d:
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {d}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay should be >= 0 but is: {weight_decay}")
        o, w, t = _split(locals(), ("foreach",))
        if isinstance(o.get("eps"), list):
            o["eps"] = tuple(o["eps"])
        super().__init__(params, o, torch_only=t, **w)


OPTIMIZERS = {cls.rule.name: cls for cls in
              (SGD, Adam, AdamW, Adagrad, RMSprop, Adadelta, Adamax, NAdam, RAdam, Lion, LAMB,
               AdaHessian, Muon, ASGD, Rprop, Adafactor)}


# --------------------------------------------------------------------------- LBFGS, SparseAdam
# Neither fits the bucketed Optimizer above (a closure-driven flat-vector method; sparse
# grads), so each wraps its raw-API class (fastopt/_lbfgs.py, fastopt/_sparse.py) over
# zero-copy NumPy views, and keeps its state in torch's own layout, so torch.optim's
# state_dicts load into them and back.

from . import _lbfgs as _lbfgs_mod  # noqa: E402
from . import _sparse as _sparse_mod  # noqa: E402


def _check_plain_tensor(p, label, what):
    if p.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{label}: expected a float32 or float64 tensor ({what}), got {p.dtype}")
    if p.device.type != "cpu" or p.is_sparse or not p.is_contiguous():
        raise ValueError(f"{label}: expected a dense, contiguous CPU tensor, got "
                         f"{p.layout} on {p.device}" + ("" if p.is_contiguous() else
                                                        " (not contiguous)"))


class LBFGS(torch.optim.Optimizer):
    """torch.optim.LBFGS on fastopt's LBFGS (``fastopt.LBFGS``), same signature and closure.

    ``step(closure)``: ``closure`` is torch's (it zeroes the grads, computes the loss, calls
    ``backward()`` and returns the loss).  One param group of float32/float64 CPU tensors.
    The flat vectors are NumPy arrays; ``self.state[params[0]]`` holds them as tensors over
    the same memory under torch's names, so ``state_dict()`` loads into torch.optim.LBFGS and
    back.  torch.optim.LBFGS has no grad pipeline, so neither has this class.
    """

    def __init__(self, params, lr=1, max_iter=20, max_eval=None, tolerance_grad=1e-7,
                 tolerance_change=1e-9, history_size=100, line_search_fn=None, *,
                 backend="auto"):
        if max_eval is None and isinstance(max_iter, int):
            max_eval = max_iter * 5 // 4
        defaults = dict(lr=lr, max_iter=max_iter, max_eval=max_eval,
                        tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
                        history_size=history_size, line_search_fn=line_search_fn)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
        self._params = self.param_groups[0]["params"]
        for i, p in enumerate(self._params):
            _check_plain_tensor(p, f"params[{i}]", "LBFGS keeps its history in the params' dtype")
        views = [p.detach().numpy() for p in self._params]
        self._impl = _lbfgs_mod.LBFGS(views, **_host_hp(defaults), backend=backend)
        self.backend = self._impl.backend

    def _grads(self):
        out = []
        for p in self._params:
            g = p.grad
            if g is None:
                out.append(np.zeros(tuple(p.shape), _numpy_dtype(p.dtype)))
            else:
                g = g.to_dense() if g.is_sparse else g
                out.append(g.detach().contiguous().numpy())
        return out

    def _state_in(self):
        st = self.state[self._params[0]]
        dt = self._impl._dtype.type
        s = {"func_evals": int(st.get("func_evals", 0)), "n_iter": int(st.get("n_iter", 0))}
        if st.get("d") is not None:
            s.update(d=st["d"].numpy(), t=float(st["t"]), H_diag=dt(float(st["H_diag"])),
                     old_dirs=[x.numpy() for x in st["old_dirs"]],
                     old_stps=[x.numpy() for x in st["old_stps"]],
                     ro=[dt(float(r)) for r in st["ro"]],
                     prev_flat_grad=st["prev_flat_grad"].numpy(),
                     prev_loss=float(st["prev_loss"]))
        self._impl._st = s

    def _state_out(self):
        s, st = self._impl._st, self.state[self._params[0]]
        st["func_evals"], st["n_iter"] = s["func_evals"], s["n_iter"]
        if s.get("d") is not None:
            st.update(d=torch.from_numpy(s["d"]), t=float(s["t"]),
                      H_diag=torch.tensor(s["H_diag"]) if isinstance(s["H_diag"], np.generic)
                      else s["H_diag"],
                      old_dirs=[torch.from_numpy(x) for x in s["old_dirs"]],
                      old_stps=[torch.from_numpy(x) for x in s["old_stps"]],
                      ro=[torch.tensor(r) for r in s["ro"]],
                      prev_flat_grad=torch.from_numpy(s["prev_flat_grad"]),
                      prev_loss=s["prev_loss"])

    @torch.no_grad()
    def step(self, closure):
        """One LBFGS step; returns the loss of the first closure call, as torch's."""
        if not callable(closure):
            raise TypeError("closure: expected a callable that re-evaluates the model, calls "
                            f"backward() and returns the loss, got {type(closure).__name__}")
        group = self.param_groups[0]
        impl_group = self._impl.param_groups[0]
        hp = {k: _number(v) for k, v in group.items() if k != "params"}
        check_hyperparameters(self._impl.rule, {**hp, **PIPELINE_DEFAULTS})
        impl_group.update(hp)
        first = []

        def raw_closure():
            with torch.enable_grad():
                loss = closure()
            if not first:
                first.append(loss)
            return float(loss), self._grads()

        self._state_in()
        self._impl.step(raw_closure)
        self._state_out()
        return first[0] if first else None


def _shaped_view(t):
    """A NumPy view of a contiguous CPU tensor's memory in its own shape (bfloat16: as
    ``_flat_view`` does it)."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_prec.bfloat16_dtype())
    return t.numpy()


class SparseAdam(torch.optim.Optimizer):
    """torch.optim.SparseAdam on fastopt's fused row kernels, for ``nn.Embedding(sparse=True)``.

    Same signature, defaults and errors as torch's (a dense grad: "SparseAdam does not
    support dense gradients, please consider Adam instead"); state under torch's names
    (``step`` an int, ``exp_avg``, ``exp_avg_sq``), so state_dicts move both ways.  The sparse
    grad's ``(indices, values)`` reach the kernel as NumPy views; duplicates are summed in
    the kernel.  ``nonfinite`` and ``backend`` as the other fastopt.torch classes.

    float16 and bfloat16 params (an embedding ``.to(torch.bfloat16)``) are stepped as the
    raw ``fastopt.SparseAdam`` steps them: only the rows a grad names are widened to
    float32, stepped, and written back with one rounding per element.  As for the other
    fastopt.torch optimizers, ``state_dtype=None`` keeps float32 moments for 16-bit params
    and ``state_dtype="param"`` the param's dtype, as torch.optim.SparseAdam keeps them;
    ``"bfloat16"``, ``master_weights`` (a float32 copy in ``state[p]["master"]``),
    ``stochastic_rounding`` (bfloat16 params without masters; hashed with ``seed`` and the
    param's ``step``) as the raw class.  ``state_dtype="q8"`` is refused: a row update
    would re-quantize the untouched rows of its 256-element blocks.  A loaded state whose
    moments have another dtype (torch's bfloat16 moments into float32 state) is converted
    at the next step; a missing ``master`` is made from the param.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False, *,
                 nonfinite="raise", backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0):
        defaults = dict(lr=lr, betas=betas, eps=eps, maximize=maximize)
        check_hyperparameters(_sparse_mod.RULE, {**_host_hp(defaults), **PIPELINE_DEFAULTS})
        self.nonfinite = check_nonfinite(nonfinite)
        if backend not in ("auto", "numba", "numpy"):
            raise ValueError(f"backend: expected 'auto', 'numba' or 'numpy' (CPU tensors), "
                             f"got {backend!r}")
        super().__init__(params, defaults)
        firsts = {}
        for gi, g in enumerate(self.param_groups):
            for pi, p in enumerate(g["params"]):
                label = self._label(gi, pi)
                if p.is_sparse:
                    raise ValueError(f"Sparse params at indices {[[gi, pi]]}: SparseAdam "
                                     "requires dense parameter tensors")
                _check_tensor(p, label)
                if p.ndim < 1:
                    raise ValueError(f"{label}: expected a tensor with a row axis (SparseAdam "
                                     "updates rows of embedding tables), got a 0-d tensor")
                firsts.setdefault(p.dtype, label)
        self.precision_options = {"state_dtype": state_dtype, "master_weights": master_weights,
                                  "stochastic_rounding": stochastic_rounding, "seed": seed}
        by_np = _sparse_mod.resolve_precisions(
            [_DtypeOnly(_numpy_dtype(dt)) for dt in firsts], list(firsts.values()), "numpy",
            self.precision_options)
        #: torch dtype -> resolved Precision, or None (the plain row kernel, state in its dtype)
        self._precisions = {dt: by_np[_numpy_dtype(dt)] for dt in firsts}
        self.backend = _backend.resolve(backend, "numpy")
        self._kernel = _sparse_mod.kernel_of(self.backend)

    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group``; a param of a dtype the constructor did not resolve (or
        a bad param) is refused, and the optimizer is left unchanged."""
        n_before = len(self.param_groups)
        super().add_param_group(param_group)
        if not hasattr(self, "_precisions"):
            return  # the constructor's own groups: it checks them itself
        gi = len(self.param_groups) - 1
        try:
            for pi, p in enumerate(self.param_groups[gi]["params"]):
                label = self._label(gi, pi)
                _check_tensor(p, label)
                if p.ndim < 1 or p.dtype not in self._precisions:
                    raise TypeError(f"{label}: expected a tensor with a row axis of a dtype "
                                    f"among the constructor's params "
                                    f"{sorted(str(d) for d in self._precisions)}, got "
                                    f"{p.ndim}-D {p.dtype}")
        except Exception:
            del self.param_groups[n_before:]
            raise

    def _label(self, gi, pi):
        return (f"param_groups[{gi}]['params'][{pi}]" if len(self.param_groups) > 1
                else f"params[{pi}]")

    def _state_of(self, p, pr):
        """The param's state, created (torch's names) or converted to the resolved dtypes."""
        st = self.state[p]
        sdt = p.dtype if pr is None else _TORCH_DTYPES[pr.state.name]
        if len(st) == 0:
            st["step"] = 0
        for n in ("exp_avg", "exp_avg_sq"):
            a = st.get(n)
            if a is None:
                st[n] = torch.zeros_like(p, dtype=sdt, memory_format=torch.contiguous_format)
            elif a.dtype != sdt or not a.is_contiguous():
                st[n] = a.to(dtype=sdt, memory_format=torch.contiguous_format)
        if pr is not None and pr.master_weights:
            m = st.get("master")
            if m is None:
                st["master"] = p.detach().to(torch.float32, memory_format=torch.contiguous_format)
            elif m.dtype != torch.float32 or not m.is_contiguous():
                st["master"] = m.to(dtype=torch.float32, memory_format=torch.contiguous_format)
        return st

    def _check_state(self, p, label, pr) -> None:
        """ValueError for a state tensor of the wrong shape (a state loaded for another param);
        nothing is written."""
        st = self.state.get(p, {})
        names = ("exp_avg", "exp_avg_sq") + (("master",) if pr is not None and
                                             pr.master_weights else ())
        for n in names:
            a = st.get(n)
            if a is not None and (not isinstance(a, torch.Tensor) or a.shape != p.shape):
                raise ValueError(f"state[{label}][{n!r}]: expected a tensor of shape "
                                 f"{tuple(p.shape)}, got {getattr(a, 'shape', a)!r}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work, finite = [], True
        for gi, group in enumerate(self.param_groups):
            hp = _host_hp({k: v for k, v in group.items() if k != "params"})
            check_hyperparameters(_sparse_mod.RULE, {**hp, **PIPELINE_DEFAULTS},
                                  f"param_groups[{gi}]: ")
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if not g.is_sparse:
                    raise RuntimeError(_sparse_mod.DENSE_MESSAGE)
                if g.sparse_dim() != 1 or g.dtype != p.dtype:
                    raise ValueError(f"grad of a {tuple(p.shape)} param: expected a sparse COO "
                                     f"grad with one sparse dimension (rows) in {p.dtype}, got "
                                     f"{g.sparse_dim()} sparse dimensions, {g.dtype}")
                pr = self._precisions.get(p.dtype, False)
                if pr is False:  # the param's dtype changed after construction (module.to())
                    raise TypeError(f"{self._label(gi, pi)}: expected a "
                                    f"{' or '.join(str(d) for d in self._precisions)} tensor "
                                    f"(the dtypes the optimizer was built for), got {p.dtype}")
                self._check_state(p, self._label(gi, pi), pr)
                idx = g._indices()[0].numpy()
                vals = _shaped_view(g._values().contiguous())
                if self.nonfinite != "ignore" and not bool(torch.isfinite(g._values()).all()):
                    finite = False
                work.append((p, hp, idx, vals, pr))
        if not finite:
            if self.nonfinite == "raise":
                raise FloatingPointError("grads: non-finite values (nonfinite='raise'; "
                                         "nothing was written)")
            return loss
        for p, hp, idx, vals, pr in work:
            st = self._state_of(p, pr)
            st["step"] += 1
            if idx.shape[0] == 0:
                continue
            s, _ = _sparse_mod.RULE.scalars(hp, int(st["step"]), {})
            order, starts, rows = _sparse_mod.coalesce(idx.astype(np.int64, copy=False))
            if pr is not None:
                views = {n: _shaped_view(st[n]) for n in ("exp_avg", "exp_avg_sq")}
                if pr.master_weights:  # (a loaded "master" is kept, unused, without them)
                    views["master"] = _shaped_view(st["master"])
                views["step"] = int(st["step"])
                _sparse_mod.widened_rows(self._kernel, _shaped_view(p), views, vals, order,
                                         starts, rows, s, hp["maximize"], pr)
                continue
            rows2 = p.shape[0]
            self._kernel(p.detach().numpy().reshape(rows2, -1),
                         st["exp_avg"].numpy().reshape(rows2, -1),
                         st["exp_avg_sq"].numpy().reshape(rows2, -1),
                         vals.reshape(vals.shape[0], -1), order, starts, rows, s,
                         hp["maximize"])
        return loss


__all__ += ["LBFGS", "SparseAdam"]
