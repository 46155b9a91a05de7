"""fastopt.save / fastopt.load: safe, atomic, cross-backend checkpoints (see docs/design.md).

* stop, save, load into a fresh optimizer, go on == never stopping, bit for bit, for
  every case of the rule table and with schedules, on each CPU backend;
* a checkpoint saved on one backend loads on another;
* loading never runs code (``allow_pickle=False``, JSON metadata, schedules rebuilt
  from their config), and a truncated, corrupted or mismatched file raises
  ``ValueError`` leaving the optimizer and its params exactly as they were;
* saving is atomic: a failure mid-write leaves the previous checkpoint whole.
"""

import copy
import os
import pickle

import numpy as np
import pytest

import fastopt as fo
from fastopt._backend import available
from fastopt._optim import OPTIMIZERS
from fastopt._rules import RULES

from _cases import CASE_IDS, CASES, make_feed

CPU_BACKENDS = [b for b in ("numpy", "numba") if available(b)]
SIZES = (5, 1, 33)


def problem(rule, steps, dtype=np.float64, seed=0):
    return make_feed(rule, SIZES, dtype, seed, steps)


def step(opt, g, e):
    return opt.step(g, e) if opt.rule.extra else opt.step(g)


def snapshot(opt, params):
    return ([p.tobytes() for p in params],
            [[{k: a.tobytes() for k, a in st.items()} for st in gst] for gst in opt.state],
            opt.step_count, copy.deepcopy(opt.group_state),
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])


def _resume_matches(make, params, feed, backend, tmp_path, stop=3):
    ref_p = [p.copy() for p in params]
    ref = make(ref_p, backend)
    for g, e in feed:
        step(ref, g, e)

    first_p = [p.copy() for p in params]
    first = make(first_p, backend)
    for g, e in feed[:stop]:
        step(first, g, e)
    path = tmp_path / "ckpt.npz"
    fo.save(first, path)
    del first

    resumed_p = [np.zeros_like(p) for p in params]  # the params come back from the file too
    resumed = make(resumed_p, backend)
    fo.load(resumed, path)
    assert resumed.step_count == stop
    for g, e in feed[stop:]:
        step(resumed, g, e)
    assert snapshot(resumed, resumed_p) == snapshot(ref, ref_p)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rule,options", [(c[0], c[1]) for c in CASES], ids=CASE_IDS)
def test_resume_is_bit_identical(rule, options, backend, tmp_path):
    params, feed = problem(rule, 7)
    _resume_matches(lambda ps, b: OPTIMIZERS[rule](ps, backend=b, **options),
                    params, feed, backend, tmp_path)


SCHEDULES = {
    "warmup_cosine": fo.schedules.warmup_cosine(0.05, 2, 6, start=0.001),
    "join": fo.schedules.join([fo.schedules.linear(0.02, 0.01, 3),
                               fo.schedules.exponential_decay(0.01, 0.5, 2, staircase=True)], [3]),
    "multistep": fo.schedules.multistep(0.1, [2, 4], 0.5),
    "piecewise": fo.schedules.piecewise_constant([1, 4], [0.01, 0.03, 0.002]),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("rule", ["adam", "nadam", "sgd"])
def test_resume_with_schedules_and_groups(rule, name, backend, tmp_path):
    """Two groups, one on a schedule; NAdam also carries group state (mu_product)."""
    params, feed = problem(rule, 7)
    extra = {"momentum": 0.9} if rule == "sgd" else {"weight_decay": 0.01}

    def make(ps, b):
        return OPTIMIZERS[rule]([{"params": ps[:1]}, {"params": ps[1:], "lr": SCHEDULES[name]}],
                                lr=0.01, backend=b, **extra)

    for stop in (1, 4):
        _resume_matches(make, params, feed, backend, tmp_path, stop=stop)


@pytest.mark.parametrize("dst", CPU_BACKENDS)
@pytest.mark.parametrize("src", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_checkpoint_loads_on_another_backend(src, dst, dtype, tmp_path):
    params, feed = problem("adam", 3, dtype)
    a_p = [p.copy() for p in params]
    a = fo.Adam(a_p, lr=0.01, amsgrad=True, backend=src)
    for g, e in feed:
        a.step(g)
    fo.save(a, tmp_path / "c.npz")
    b_p = [np.zeros_like(p) for p in params]
    b = fo.Adam(b_p, backend=dst)
    fo.load(b, tmp_path / "c.npz")
    assert b.backend == dst
    assert snapshot(b, b_p) == snapshot(a, a_p)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_params_optional(backend, tmp_path):
    params, feed = problem("sgd", 2)
    opt = fo.SGD(params, lr=0.1, momentum=0.9, backend=backend)
    for g, e in feed:
        opt.step(g)
    fo.save(opt, tmp_path / "state-only.npz", params=False)
    assert not any(k.startswith("param/") for k in np.load(tmp_path / "state-only.npz").files)
    fo.save(opt, tmp_path / "full.npz")
    other = [np.full_like(p, 7.0) for p in params]
    o2 = fo.SGD(other, backend=backend)
    fo.load(o2, tmp_path / "state-only.npz")
    assert all((p == 7.0).all() for p in other)
    fo.load(o2, tmp_path / "full.npz", params=False)
    assert all((p == 7.0).all() for p in other)
    fo.load(o2, tmp_path / "full.npz")
    assert [p.tobytes() for p in other] == [p.tobytes() for p in params]


def test_file_layout_is_plain_npz_and_json(tmp_path):
    """The documented format: a uint8 JSON entry and one array per state tensor and param."""
    import json

    p = [np.ones(3), np.ones((2, 2), np.float32)]
    opt = fo.Adam([{"params": p[:1]}, {"params": p[1:], "lr": fo.schedules.cosine_decay(0.1, 10)}],
                  backend="numpy")
    opt.step([np.ones(3), np.ones((2, 2), np.float32)])
    fo.save(opt, tmp_path / "c.npz")
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["__fastopt__", "param/0", "param/1", "state/0/exp_avg",
                                   "state/0/exp_avg_sq", "state/1/exp_avg", "state/1/exp_avg_sq"]
        meta = json.loads(z["__fastopt__"].tobytes())
        assert z["state/1/exp_avg"].dtype == np.float32 and z["state/1/exp_avg"].shape == (2, 2)
    assert meta["format"] == "fastopt-checkpoint" and meta["version"] == 1
    assert meta["rule"] == "adam" and meta["step_count"] == 1
    assert meta["param_groups"][1]["lr"] == {"schedule_config": {"schedule": "CosineDecay",
                                                                 "init": 0.1, "steps": 10, "end": 0.0}}
    assert meta["param_groups"][0]["betas"] == [0.9, 0.999]


# ------------------------------------------------------------------ bad files

@pytest.fixture
def saved(tmp_path):
    """A good checkpoint of a 2-group Adam (amsgrad, a schedule), and a different optimizer to load into."""
    params, feed = problem("adam", 3)
    src = fo.Adam([{"params": params[:2]}, {"params": params[2:], "lr": fo.schedules.constant(0.02)}],
                  amsgrad=True, backend="numpy")
    for g, e in feed:
        src.step(g)
    path = tmp_path / "good.npz"
    fo.save(src, path)
    return path, params


def _target(backend, seed=3):
    params, feed = problem("adam", 1, seed=seed)
    opt = fo.Adam([{"params": params[:2]}, {"params": params[2:]}], amsgrad=True, backend=backend)
    opt.step(feed[0][0])
    return opt, params


def _rewrite(src, dst, change):
    """Copy the npz at ``src`` to ``dst`` with ``change(dict_of_arrays)`` applied."""
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    with open(dst, "wb") as f:
        np.savez(f, **arrays)
    return dst


def _meta_change(fn):
    import json

    def change(arrays):
        meta = json.loads(arrays["__fastopt__"].tobytes())
        fn(meta)
        arrays["__fastopt__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    return change


def _set_entry(key, index, value):
    def change(arrays):
        a = arrays[key].copy()
        a[index] = value
        arrays[key] = a
    return change


def _corruptions(good, tmp_path):
    data = good.read_bytes()
    n = len(data)
    out = []
    for cut in (0, 10, n // 3, n // 2, n - 30, n - 1):
        p = tmp_path / f"truncated-{cut}.npz"
        p.write_bytes(data[:cut])
        out.append((f"truncated-{cut}", p, r"not a readable fastopt checkpoint \(truncated or corrupted\?\)"))
    flipped = bytearray(data)
    i = data.index(b"state/0/exp_avg_sq.npy")  # the member's local header; its data follows
    for k in range(i + 200, i + 260):
        flipped[k] ^= 0xFF
    p = tmp_path / "flipped.npz"
    p.write_bytes(bytes(flipped))
    out.append(("flipped-bytes", p, r"not a readable fastopt checkpoint"))
    p = tmp_path / "text.npz"
    p.write_text("hello, I am not a checkpoint")
    out.append(("not-a-zip", p, r"not a readable fastopt checkpoint"))
    p = tmp_path / "single.npy"
    np.save(p, np.zeros(3))
    out.append(("npy", p, r"expected a .npz archive written by fastopt.save, got a .npy array"))

    def drop(key):
        return lambda a: a.pop(key)

    edits = [
        ("no-metadata", drop("__fastopt__"), r"no '__fastopt__' metadata entry"),
        ("metadata-not-json", lambda a: a.update(__fastopt__=np.frombuffer(b"{oops", np.uint8)),
         r"metadata is not valid JSON"),
        ("metadata-float", lambda a: a.update(__fastopt__=np.zeros(3)), r"expected a 1-D uint8 array"),
        ("wrong-format", _meta_change(lambda m: m.update(format="other")), r"expected metadata with format"),
        ("future-version", _meta_change(lambda m: m.update(version=2)), r"expected format version 1, got 2"),
        ("wrong-rule", _meta_change(lambda m: m.update(rule="sgd")), r"expected a 'adam' checkpoint, got 'sgd'"),
        ("step-count-str", _meta_change(lambda m: m.update(step_count="3")), r"metadata\['step_count'\]: expected int"),
        ("param-count", _meta_change(lambda m: m["params"].pop()), r"expected 3 params, got 2"),
        ("missing-state-array", drop("state/2/max_exp_avg_sq"), r"missing array 'state/2/max_exp_avg_sq'"),
        ("missing-param-array", drop("param/2"), r"missing array 'param/2'"),
        ("extra-array", lambda a: a.update(evil=np.zeros(1)), r"unexpected arrays \['evil'\]"),
        ("param-shape", lambda a: a.update({"param/2": np.zeros(4)}), r"param/2: expected float64 \(33,\) .*got float64 \(4,\)"),
        ("state-dtype", lambda a: a.update({"state/2/exp_avg": a["state/2/exp_avg"].astype(np.float32)}),
         r"cannot be loaded into this optimizer: state_dict\['state'\]\[2\]\['exp_avg'\]: expected float64 \(33,\)"),
        ("state-shape-last", lambda a: a.update({"state/2/exp_avg_sq": np.zeros(32)}),
         r"state_dict\['state'\]\[2\]\['exp_avg_sq'\]: expected float64 \(33,\)"),
        ("bad-hp", _meta_change(lambda m: m["param_groups"][1].update(eps=-1.0)),
         r"cannot be loaded into this optimizer: state_dict\['param_groups'\]\[1\]: eps: expected a finite number > 0"),
        ("unknown-schedule", _meta_change(lambda m: m["param_groups"][1].update(
            lr={"schedule_config": {"schedule": "os.system", "cmd": "touch pwned"}})), r"bad schedule config"),
        ("schedule-bad-args", _meta_change(lambda m: m["param_groups"][1].update(
            lr={"schedule_config": {"schedule": "Constant", "value": -1}})), r"bad schedule config: value"),
        ("lr-dict", _meta_change(lambda m: m["param_groups"][1].update(lr={"__reduce__": "x"})),
         r"expected a number or \{'schedule_config'"),
        ("group-state", _meta_change(lambda m: m.update(group_state=[{"mu": "x"}, {}])),
         r"group_state\[0\]: expected a dict of numbers"),
        ("group-count", _meta_change(lambda m: m["param_groups"].pop()),
         r"state_dict\['param_groups'\]: expected 2 groups, got 1"),
        # values: a diverged run's NaN, or an edited second moment, must not load silently
        ("state-nan", _set_entry("state/2/exp_avg", 5, np.nan),
         r"cannot be loaded into this optimizer: state_dict\['state'\]\[2\]\['exp_avg'\]: "
         r"expected finite values, got nan at flat index 5"),
        ("state-inf-square", _set_entry("state/2/exp_avg_sq", 32, np.inf),
         r"state_dict\['state'\]\[2\]\['exp_avg_sq'\]: expected finite values, got inf at flat index 32"),
        ("state-negative-square", _set_entry("state/2/max_exp_avg_sq", 0, -1.0),
         r"state_dict\['state'\]\[2\]\['max_exp_avg_sq'\]: expected values >= 0 .*got -1.0 at flat index 0"),
    ]
    for name, change, pattern in edits:
        out.append((name, _rewrite(good, tmp_path / f"{name}.npz", change), pattern))
    return out


CORRUPTION_IDS = ["truncated-0", "truncated-10", "truncated-a-third", "truncated-half",
                  "truncated-tail", "truncated-1", "flipped-bytes", "not-a-zip", "npy",
                  "no-metadata", "metadata-not-json", "metadata-float", "wrong-format",
                  "future-version", "wrong-rule", "step-count-str", "param-count",
                  "missing-state-array", "missing-param-array", "extra-array", "param-shape",
                  "state-dtype", "state-shape-last", "bad-hp", "unknown-schedule",
                  "schedule-bad-args", "lr-dict", "group-state", "group-count", "state-nan",
                  "state-inf-square", "state-negative-square"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("index", range(len(CORRUPTION_IDS)), ids=CORRUPTION_IDS)
def test_bad_checkpoint_leaves_optimizer_unchanged(index, backend, saved, tmp_path):
    good, _ = saved
    name, path, pattern = _corruptions(good, tmp_path)[index]
    opt, params = _target(backend)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=pattern) as info:
        fo.load(opt, path)
    assert str(path) in str(info.value)  # the message names the file
    assert snapshot(opt, params) == before
    fo.load(opt, good)  # and the optimizer still works with a good file
    assert opt.step_count == 3


#: param-shaped square state (Adafactor's factors through fo.load: tests/test_adafactor.py)
SQUARE_ENTRIES = sorted((r, n) for r, rule in RULES.items() for n in rule.nonnegative_state
                        if rule.state_shape is None)
ALL_STATE_OPTIONS = {"adam": dict(amsgrad=True), "adamw": dict(amsgrad=True)}


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf], ids=["negative", "nan", "inf"])
@pytest.mark.parametrize("rule,name", SQUARE_ENTRIES, ids=[f"{r}-{n}" for r, n in SQUARE_ENTRIES])
def test_bad_state_values_in_file_are_refused(rule, name, bad, tmp_path):
    """Every rule's square state, through fo.load: refused, named, params and state untouched."""
    params, feed = problem(rule, 2)
    opts = ALL_STATE_OPTIONS.get(rule, {})
    src = OPTIMIZERS[rule]([p.copy() for p in params], backend="numpy", **opts)
    for g, e in feed:
        step(src, g, e)
    good = tmp_path / "good.npz"
    fo.save(src, good)
    path = _rewrite(good, tmp_path / "bad.npz", _set_entry(f"state/2/{name}", 3, bad))
    target_p = [np.full_like(p, 7.0) for p in params]
    target = OPTIMIZERS[rule](target_p, backend="numpy", **opts)
    before = snapshot(target, target_p)
    what = r"expected values >= 0" if bad == -1.0 else r"expected finite values"
    with pytest.raises(ValueError, match=rf"state_dict\['state'\]\[2\]\['{name}'\]: {what}.*at flat index 3"):
        fo.load(target, path)
    assert snapshot(target, target_p) == before  # neither the state nor the params were written
    fo.load(target, good)
    assert snapshot(target, target_p) == snapshot(src, [p for g in src.param_groups for p in g["params"]])


class _Pwn:
    """Unpickling this would create a file: the proof that loading ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_loading_never_unpickles(saved, tmp_path):
    good, _ = saved
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.npz"
    with np.load(good, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    obj = np.empty(1, dtype=object)
    obj[0] = _Pwn(str(marker))
    arrays["state/0/exp_avg"] = obj
    with open(evil, "wb") as f:
        np.savez(f, **arrays)  # numpy pickles object arrays
    assert pickle.loads(pickle.dumps(_Pwn(str(tmp_path / "selftest")))) is not None
    assert (tmp_path / "selftest").exists()  # the payload does work when unpickled ...
    opt, params = _target("numpy")
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"allow_pickle=False"):
        fo.load(opt, evil)
    assert not marker.exists()  # ... and fastopt.load never unpickled it
    assert snapshot(opt, params) == before


def test_missing_file_is_file_not_found(tmp_path):
    opt, _ = _target("numpy")
    with pytest.raises(FileNotFoundError):
        fo.load(opt, tmp_path / "nope.npz")


# ------------------------------------------------------------------ saving

def test_save_is_atomic(saved, monkeypatch, tmp_path):
    """A failure halfway through writing leaves the old checkpoint whole and no temp file."""
    good, _ = saved
    old = good.read_bytes()
    opt, params = _target("numpy", seed=9)
    real_savez = np.savez

    def dying_savez(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", dying_savez)
    with pytest.raises(OSError, match="disk full"):
        fo.save(opt, good)
    monkeypatch.setattr(np, "savez", real_savez)
    assert good.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["good.npz"]
    fo.save(opt, good)  # a successful save replaces it
    assert good.read_bytes() != old
    assert sorted(os.listdir(tmp_path)) == ["good.npz"]


def test_save_refuses_what_it_cannot_store(tmp_path):
    """A plain callable lr has no config: TypeError before any file is created (never a pickle)."""
    opt = fo.SGD([np.ones(3)], lr=lambda t: 0.1, backend="numpy")
    with pytest.raises(TypeError, match=r"lr.*only fastopt.schedules objects have; got function"):
        fo.save(opt, tmp_path / "c.npz")
    assert os.listdir(tmp_path) == []


def test_state_dict_is_a_detached_host_copy():
    """torch-like state_dict(): host copies, so editing it (or the optimizer) does not leak across."""
    p = [np.ones(4)]
    opt = fo.Adam(p, backend="numpy")
    opt.step([np.ones(4)])
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"][...] = 99.0
    sd["param_groups"][0]["betas"] = (0.5, 0.5)
    assert not (opt.state[0][0]["exp_avg"] == 99.0).any()
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    opt.step([np.ones(4)])
    assert (sd["state"][0]["exp_avg"] == 99.0).all()
