"""Checkpoints: an optimizer's state (and optionally its params) in one ``.npz`` file.

Loading never executes code: the file is read with ``np.load(path,
allow_pickle=False)``, the metadata is JSON, and a learning-rate schedule is
rebuilt by :func:`fastopt.schedules.from_config` (only fastopt's own schedule
constructors run).  A checkpoint holds host (NumPy) arrays, so one saved from
any backend loads into an optimizer on any other.

File format (version 1), a plain NumPy ``.npz`` (an uncompressed zip):

``__fastopt__``
    uint8 array: UTF-8 JSON metadata ``{"format": "fastopt-checkpoint",
    "version": 1, "fastopt": <version>, "rule": "adam", "backend": <saved
    on>, "step_count": t, "param_groups": [{<hyperparameters>, "params":
    [flat indices]}], "group_state": [{...}], "state_names": {"<i>":
    [names]}, "params": [{"shape": [...], "dtype": "float32"}, ...],
    "has_params": bool, "precision": {state_dtype, master_weights,
    stochastic_rounding, seed, min_8bit_size}, "q8": {"blocksize": 256,
    "maps": {state name: "dynamic_signed" | "dynamic_unsigned"}} (only with
    8-bit state)}``.  A schedule ``lr`` is stored as its
    ``config()`` dict (``{"schedule": "CosineDecay", ...}``); a learning rate
    that is any other callable cannot be saved (``TypeError``, nothing is
    written).
``state/<i>/<name>``
    the state array ``name`` (``exp_avg``, ...) of the i-th param (flat
    index over all groups, as ``state_dict()`` numbers them).
    An 8-bit state ``name`` is two arrays: ``state/<i>/<name>`` (uint8 codes)
    and ``state/<i>/<name>_absmax`` (float32, one per block).
``param/<i>``
    the i-th param, when saved with ``params=True`` (the default).

Every array keeps its dtype exactly.  NumPy's ``.npz`` has no bfloat16 (a
bfloat16 array would need pickle), so a bfloat16 array is stored as its
``uint16`` bits and the metadata's ``"bit_views": {"<array key>": "bfloat16"}``
tags it; loading views the bits as ``ml_dtypes.bfloat16`` again (no rounding
anywhere).  float16 is a NumPy dtype and is stored as is.

The file is written to a temporary file in the same directory, flushed to
disk and moved over ``path`` with ``os.replace``: a crash mid-save leaves the
old checkpoint whole.  ``path`` is used exactly as given (no ``.npz`` is
appended).
"""

from __future__ import annotations

import json
import numbers
import os
import tempfile

import numpy as np

from . import precision as _prec
from . import schedules as _schedules
from ._state import check_like, plan_load, to_host

FORMAT = "fastopt-checkpoint"
VERSION = 1
META_KEY = "__fastopt__"


def _json_value(name, v):
    """A hyperparameter as JSON; a schedule as its config."""
    if callable(v):
        if not isinstance(v, _schedules.Schedule):
            raise TypeError(f"{name}: a checkpoint stores a learning-rate schedule as its config, "
                            f"which only fastopt.schedules objects have; got {type(v).__name__}")
        return {"schedule_config": v.config()}
    if isinstance(v, tuple):
        return [_json_value(f"{name}[{i}]", x) for i, x in enumerate(v)]
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    if v is None or isinstance(v, (bool, int, float, str, list)):
        return v
    raise TypeError(f"{name}: cannot store a {type(v).__name__} in a checkpoint")


def save(optimizer, path, *, params: bool = True) -> None:
    """Write ``optimizer``'s state (and, with ``params=True``, its params) to ``path`` atomically.

    See the module docstring for the format.  Nothing is written when the
    state cannot be stored (a non-fastopt schedule as ``lr``).
    """
    from . import __version__

    sd = optimizer.state_dict()
    groups = []
    for gi, g in enumerate(sd["param_groups"]):
        groups.append({k: _json_value(f"param_groups[{gi}][{k!r}]", v) for k, v in g.items()})
    all_params = [p for g in optimizer.param_groups for p in g["params"]]
    meta = {
        "format": FORMAT, "version": VERSION, "fastopt": __version__,
        "rule": sd["rule"], "backend": optimizer.backend, "step_count": int(sd["step_count"]),
        "param_groups": groups,
        "group_state": [{k: float(v) for k, v in g.items()} for g in sd["group_state"]],
        "state_names": {str(i): sorted(st) for i, st in sd["state"].items()},
        "params": [{"shape": list(p.shape), "dtype": str(p.dtype)} for p in all_params],
        "has_params": bool(params),
        "precision": sd["precision"],
    }
    if "q8" in sd:
        meta["q8"] = sd["q8"]
    arrays, bit_views = {}, {}
    for i, st in sd["state"].items():
        for name, a in st.items():
            arrays[f"state/{i}/{name}"] = a
    if params:
        for i, p in enumerate(all_params):
            arrays[f"param/{i}"] = to_host(p)
    for k, a in arrays.items():
        if _prec.is_bfloat16(a.dtype):
            arrays[k] = a.view(np.uint16)  # the bits, exactly; .npz has no bfloat16 without pickle
            bit_views[k] = "bfloat16"
    meta["bit_views"] = bit_views
    text = json.dumps(meta, allow_nan=False, sort_keys=True)
    arrays[META_KEY] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _bad(path, what):
    return ValueError(f"checkpoint {path!r}: {what}")


def _read(path) -> dict:
    """Every array of the file, read (and CRC-checked) in full, or a ValueError."""
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise _bad(path, "expected a .npz archive written by fastopt.save, got a .npy array")
        with z:
            return {k: z[k] for k in z.files}
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except ValueError as e:
        if str(e).startswith(f"checkpoint {path!r}"):
            raise
        raise _bad(path, f"not a readable fastopt checkpoint (truncated or corrupted?): {e}") from e
    except Exception as e:  # zipfile.BadZipFile (truncated), zlib.error, EOFError, OSError, ...
        raise _bad(path, f"not a readable fastopt checkpoint (truncated or corrupted?): "
                         f"{type(e).__name__}: {e}") from e


def _decode_hp(path, gi, name, v, default):
    if isinstance(v, dict):
        if set(v) != {"schedule_config"}:
            raise _bad(path, f"param_groups[{gi}][{name!r}]: expected a number or "
                             f"{{'schedule_config': ...}}, got {v!r:.200}")
        try:
            return _schedules.from_config(v["schedule_config"])
        except (TypeError, ValueError) as e:
            raise _bad(path, f"param_groups[{gi}][{name!r}]: bad schedule config: {e}") from e
    if isinstance(default, tuple) and isinstance(v, list):
        return tuple(v)
    return v


def _metadata(path, arrays) -> dict:
    raw = arrays.get(META_KEY)
    if raw is None:
        raise _bad(path, f"no {META_KEY!r} metadata entry: not written by fastopt.save")
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise _bad(path, f"{META_KEY!r}: expected a 1-D uint8 array, got {raw.dtype} {raw.shape}")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _bad(path, f"metadata is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _bad(path, f"expected metadata with format {FORMAT!r}, got {meta!r:.200}")
    if meta.get("version") != VERSION:
        raise _bad(path, f"expected format version {VERSION}, got {meta.get('version')!r}")
    need = {"rule": str, "step_count": int, "param_groups": list, "group_state": list,
            "state_names": dict, "params": list, "has_params": bool}
    for k, t in need.items():
        if not isinstance(meta.get(k), t) or (t is int and isinstance(meta[k], bool)):
            raise _bad(path, f"metadata[{k!r}]: expected {t.__name__}, got {meta.get(k)!r:.200}")
    views = meta.setdefault("bit_views", {})
    if not isinstance(views, dict) or any(
            not isinstance(k, str) or v != "bfloat16" for k, v in views.items()):
        raise _bad(path, f"metadata['bit_views']: expected {{array key: 'bfloat16'}}, "
                         f"got {views!r:.200}")
    for k in views:
        a = arrays.get(k)
        if a is None:
            raise _bad(path, f"metadata['bit_views'] names {k!r}, which the file does not hold")
        if a.dtype != np.uint16:
            raise _bad(path, f"{k}: expected the uint16 bits of a bfloat16 array, got {a.dtype}")
        arrays[k] = a.view(_prec.bfloat16_dtype())
    return meta


def load(optimizer, path, *, params: bool = True, convert: bool = False) -> None:
    """Load a checkpoint written by :func:`save` into ``optimizer`` (any backend).

    Restores the state, step count, hyperparameters (schedules included) and
    group state; with ``params=True`` also copies the saved params into the
    optimizer's params in place (when the file has them).  Everything is read
    and checked before anything is written: a truncated or corrupted file, or
    one that does not fit the optimizer, raises ``ValueError`` and leaves the
    optimizer (and its params) as they were.  The state's values are checked
    too: a non-finite entry, or a negative one in a sum or average of squares
    (Adam's ``exp_avg_sq``, Adagrad's ``sum``, ...), is refused the same way.
    The precision options saved with it must be the optimizer's, and a state in
    another format (8-bit or not) needs ``convert=True``, as for
    ``Optimizer.load_state_dict``.
    """
    path = os.fspath(path)
    arrays = _read(path)
    meta = _metadata(path, arrays)
    if meta["rule"] != optimizer.rule.name:
        raise _bad(path, f"expected a {optimizer.rule.name!r} checkpoint, got {meta['rule']!r}")
    all_params = [p for g in optimizer.param_groups for p in g["params"]]
    if len(meta["params"]) != len(all_params):
        raise _bad(path, f"expected {len(all_params)} params, got {len(meta['params'])}")

    groups = []
    for gi, g in enumerate(meta["param_groups"]):
        if not isinstance(g, dict):
            raise _bad(path, f"param_groups[{gi}]: expected a dict, got {g!r:.200}")
        groups.append({k: _decode_hp(path, gi, k, v, optimizer.defaults.get(k))
                       for k, v in g.items()})
    state, expected = {}, {META_KEY}
    for key, names in meta["state_names"].items():
        if not (isinstance(key, str) and key.isdigit() and isinstance(names, list)):
            raise _bad(path, f"state_names: bad entry {key!r}: {names!r:.200}")
        st = {}
        for name in names:
            k = f"state/{key}/{name}"
            if k not in arrays:
                raise _bad(path, f"missing array {k!r} (truncated or edited?)")
            st[name] = arrays[k]
            expected.add(k)
        state[int(key)] = st

    file_params = None
    if meta["has_params"]:
        file_params = []
        for i, p in enumerate(all_params):
            k = f"param/{i}"
            a = arrays.get(k)
            if a is None:
                raise _bad(path, f"missing array {k!r} (truncated or edited?)")
            try:
                check_like(a, p, k, f"params[{i}]")
            except ValueError as e:
                raise _bad(path, str(e)) from None
            file_params.append(a)
            expected.add(k)
    extra = sorted(set(arrays) - expected)
    if extra:
        raise _bad(path, f"unexpected arrays {extra[:5]} (not written by fastopt.save?)")
    for gi, g in enumerate(meta["group_state"]):
        if not isinstance(g, dict) or not all(isinstance(v, numbers.Real) for v in g.values()):
            raise _bad(path, f"group_state[{gi}]: expected a dict of numbers, got {g!r:.200}")

    sd = {"rule": meta["rule"], "step_count": meta["step_count"], "param_groups": groups,
          "state": state, "group_state": meta["group_state"]}
    for key in ("precision", "q8"):  # checked by plan_load (absent from older files)
        if key in meta:
            sd[key] = meta[key]
    own = getattr(optimizer, "_load_checkpoint", None)
    if own is not None:  # LBFGS, SparseAdam: their own state layout and checks
        try:
            own(sd, file_params if params else None)
        except (TypeError, ValueError) as e:
            raise _bad(path, f"cannot be loaded into this optimizer: {e}") from e
        return
    try:
        # the same checks as load_state_dict, values included (finite; >= 0 where the rule
        # keeps squares): a NaN saved by a diverged run is refused here, not at the next step
        plan = plan_load(optimizer, sd, file_params if params else None, convert=convert)
    except (TypeError, ValueError) as e:
        raise _bad(path, f"cannot be loaded into this optimizer: {e}") from e
    optimizer._write(plan)


__all__ = ["save", "load"]
