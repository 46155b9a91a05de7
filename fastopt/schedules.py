"""Learning-rate schedules: pure, picklable ``callable(step) -> float``.

``step`` counts from 0: the optimizer calls ``schedule(t - 1)`` at its t-th
step, so ``schedule(0)`` is the first learning rate (as optax counts).  Each
schedule is a small object with ``config()``, a JSON-able dict that
:func:`from_config` turns back into an equal schedule (checkpoints store
schedules this way, never as pickles).
"""

from __future__ import annotations

import bisect
import math

__all__ = ["Schedule", "constant", "exponential_decay", "step_decay", "multistep", "linear",
           "polynomial", "cosine_decay", "warmup_cosine", "piecewise_constant", "join",
           "from_config"]

_KINDS: dict = {}


def _num(name, v, *, lo=None, lo_open=False, integer=False):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok and integer:
        ok = float(v).is_integer()
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if not ok:
        want = "an integer" if integer else "a finite number"
        if lo is not None:
            want += f" {'>' if lo_open else '>='} {lo}"
        raise ValueError(f"{name}: expected {want}, got {v!r}")
    return int(v) if integer else float(v)


def _step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, int) and not float(step).is_integer():
        raise ValueError(f"step: expected an integer >= 0, got {step!r}")
    step = int(step)
    if step < 0:
        raise ValueError(f"step: expected an integer >= 0, got {step}")
    return step


class Schedule:
    """Base of every schedule: equality, repr and ``config()`` come from ``_fields``."""

    _fields: tuple = ()

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        _KINDS[cls.__name__] = cls

    def __call__(self, step) -> float:
        return float(self._value(_step(step)))

    def _value(self, step: int) -> float:
        raise NotImplementedError

    def config(self) -> dict:
        out = {"schedule": type(self).__name__}
        for f in self._fields:
            v = getattr(self, f)
            if f == "schedules":
                v = [s.config() for s in v]
            elif isinstance(v, tuple):
                v = list(v)
            out[f] = v
        return out

    def __eq__(self, other):
        return type(self) is type(other) and self.config() == other.config()

    def __hash__(self):
        return hash(repr(self))

    def __repr__(self):
        args = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({args})"


def from_config(cfg: dict) -> Schedule:
    """Rebuild a schedule from ``Schedule.config()`` (no code runs but these constructors)."""
    if not isinstance(cfg, dict) or cfg.get("schedule") not in _KINDS:
        raise ValueError(f"schedule config: expected a dict with 'schedule' one of {sorted(_KINDS)}, "
                         f"got {cfg!r}")
    kw = {k: v for k, v in cfg.items() if k != "schedule"}
    if "schedules" in kw:
        kw["schedules"] = [from_config(c) for c in kw["schedules"]]
    return _KINDS[cfg["schedule"]](**kw)


class Constant(Schedule):
    _fields = ("value",)

    def __init__(self, value):
        self.value = _num("value", value, lo=0)

    def _value(self, step):
        return self.value


class ExponentialDecay(Schedule):
    _fields = ("init", "rate", "steps", "staircase")

    def __init__(self, init, rate, steps=1, staircase=False):
        self.init = _num("init", init, lo=0)
        self.rate = _num("rate", rate, lo=0)
        self.steps = _num("steps", steps, lo=0, lo_open=True, integer=True)
        self.staircase = bool(staircase)

    def _value(self, step):
        e = step // self.steps if self.staircase else step / self.steps
        return self.init * self.rate ** e


class StepDecay(Schedule):
    _fields = ("init", "step_size", "gamma")

    def __init__(self, init, step_size, gamma=0.1):
        self.init = _num("init", init, lo=0)
        self.step_size = _num("step_size", step_size, lo=0, lo_open=True, integer=True)
        self.gamma = _num("gamma", gamma, lo=0)

    def _value(self, step):
        return self.init * self.gamma ** (step // self.step_size)


class Multistep(Schedule):
    _fields = ("init", "milestones", "gamma")

    def __init__(self, init, milestones, gamma=0.1):
        self.init = _num("init", init, lo=0)
        ms = tuple(_num(f"milestones[{i}]", m, lo=0, integer=True) for i, m in enumerate(milestones))
        if list(ms) != sorted(set(ms)):
            raise ValueError(f"milestones: expected strictly increasing integers, got {list(milestones)}")
        self.milestones = ms
        self.gamma = _num("gamma", gamma, lo=0)

    def _value(self, step):
        return self.init * self.gamma ** bisect.bisect_right(self.milestones, step)


class Polynomial(Schedule):
    """``end + (init - end) * (1 - min(t, T)/T) ** power`` (optax.polynomial_schedule)."""

    _fields = ("init", "end", "steps", "power")

    def __init__(self, init, end=0.0, steps=1, power=1.0):
        self.init = _num("init", init, lo=0)
        self.end = _num("end", end, lo=0)
        self.steps = _num("steps", steps, lo=0, lo_open=True, integer=True)
        self.power = _num("power", power, lo=0, lo_open=True)

    def _value(self, step):
        frac = 1.0 - min(step, self.steps) / self.steps
        return self.end + (self.init - self.end) * frac ** self.power


class Linear(Polynomial):
    """``init * (1 - t/T)`` when end is 0; constant ``end`` after ``steps``."""

    _fields = ("init", "end", "steps")

    def __init__(self, init, end=0.0, steps=1):
        super().__init__(init, end, steps, 1.0)


class CosineDecay(Schedule):
    """``end + (init - end) * (1 + cos(pi * min(t, T)/T)) / 2`` (optax.cosine_decay_schedule, alpha = end/init)."""

    _fields = ("init", "steps", "end")

    def __init__(self, init, steps, end=0.0):
        self.init = _num("init", init, lo=0)
        self.steps = _num("steps", steps, lo=0, lo_open=True, integer=True)
        self.end = _num("end", end, lo=0)

    def _value(self, step):
        frac = min(step, self.steps) / self.steps
        return self.end + (self.init - self.end) * 0.5 * (1.0 + math.cos(math.pi * frac))


class WarmupCosine(Schedule):
    """Linear warm-up from ``start`` to ``peak`` over ``warmup`` steps, then cosine to ``end``
    at step ``steps`` (total, warm-up included), as optax.warmup_cosine_decay_schedule."""

    _fields = ("peak", "warmup", "steps", "start", "end")

    def __init__(self, peak, warmup, steps, start=0.0, end=0.0):
        self.peak = _num("peak", peak, lo=0)
        self.warmup = _num("warmup", warmup, lo=0, integer=True)
        self.steps = _num("steps", steps, lo=0, lo_open=True, integer=True)
        if self.warmup > self.steps:
            raise ValueError(f"warmup: expected at most steps={self.steps}, got {warmup}")
        self.start = _num("start", start, lo=0)
        self.end = _num("end", end, lo=0)

    def _value(self, step):
        if step < self.warmup:
            return self.start + (self.peak - self.start) * step / self.warmup
        span = self.steps - self.warmup
        frac = 1.0 if span == 0 else min(step - self.warmup, span) / span
        return self.end + (self.peak - self.end) * 0.5 * (1.0 + math.cos(math.pi * frac))


class PiecewiseConstant(Schedule):
    """``values[i]`` for ``boundaries[i-1] <= t < boundaries[i]``; ``len(values) == len(boundaries) + 1``."""

    _fields = ("boundaries", "values")

    def __init__(self, boundaries, values):
        b = tuple(_num(f"boundaries[{i}]", x, lo=0, integer=True) for i, x in enumerate(boundaries))
        if list(b) != sorted(set(b)):
            raise ValueError(f"boundaries: expected strictly increasing integers, got {list(boundaries)}")
        v = tuple(_num(f"values[{i}]", x, lo=0) for i, x in enumerate(values))
        if len(v) != len(b) + 1:
            raise ValueError(f"values: expected {len(b) + 1} values (one more than boundaries), got {len(v)}")
        self.boundaries, self.values = b, v

    def _value(self, step):
        return self.values[bisect.bisect_right(self.boundaries, step)]


class Join(Schedule):
    """``schedules[i](t - boundaries[i-1])`` on ``[boundaries[i-1], boundaries[i])`` (optax.join_schedules)."""

    _fields = ("schedules", "boundaries")

    def __init__(self, schedules, boundaries):
        schedules = list(schedules)
        for i, s in enumerate(schedules):
            if not callable(s):
                raise TypeError(f"schedules[{i}]: expected a schedule, got {type(s).__name__}")
        b = tuple(_num(f"boundaries[{i}]", x, lo=0, integer=True) for i, x in enumerate(boundaries))
        if list(b) != sorted(set(b)):
            raise ValueError(f"boundaries: expected strictly increasing integers, got {list(boundaries)}")
        if len(schedules) != len(b) + 1:
            raise ValueError(f"schedules: expected {len(b) + 1} schedules (one more than boundaries), "
                             f"got {len(schedules)}")
        self.schedules, self.boundaries = tuple(schedules), b

    def _value(self, step):
        i = bisect.bisect_right(self.boundaries, step)
        offset = self.boundaries[i - 1] if i else 0
        return self.schedules[i](step - offset)

    def config(self):
        for i, s in enumerate(self.schedules):
            if not isinstance(s, Schedule):
                raise TypeError(f"schedules[{i}]: only fastopt schedules can be stored as config")
        return super().config()


def constant(value) -> Schedule:
    """``value`` at every step."""
    return Constant(value)


def exponential_decay(init, rate, steps=1, staircase=False) -> Schedule:
    """``init * rate ** (t / steps)`` (``t // steps`` when ``staircase``)."""
    return ExponentialDecay(init, rate, steps, staircase)


def step_decay(init, step_size, gamma=0.1) -> Schedule:
    """``init * gamma ** (t // step_size)`` (torch's StepLR)."""
    return StepDecay(init, step_size, gamma)


def multistep(init, milestones, gamma=0.1) -> Schedule:
    """``init * gamma ** (number of milestones <= t)`` (torch's MultiStepLR)."""
    return Multistep(init, milestones, gamma)


def linear(init, end=0.0, steps=1) -> Schedule:
    """From ``init`` to ``end`` linearly over ``steps``, then ``end``; ``init * (1 - t/T)`` when end=0."""
    return Linear(init, end, steps)


def polynomial(init, end=0.0, steps=1, power=1.0) -> Schedule:
    """``end + (init - end) * (1 - min(t, T)/T) ** power``."""
    return Polynomial(init, end, steps, power)


def cosine_decay(init, steps, end=0.0) -> Schedule:
    """Half a cosine from ``init`` to ``end`` over ``steps``, then ``end``."""
    return CosineDecay(init, steps, end)


def warmup_cosine(peak, warmup, steps, start=0.0, end=0.0) -> Schedule:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``end`` at ``steps``."""
    return WarmupCosine(peak, warmup, steps, start, end)


def piecewise_constant(boundaries, values) -> Schedule:
    """``values[i]`` between ``boundaries[i-1]`` and ``boundaries[i]``."""
    return PiecewiseConstant(boundaries, values)


def join(schedules, boundaries) -> Schedule:
    """Run ``schedules[i]`` from ``boundaries[i-1]``, each restarted at 0 there."""
    return Join(schedules, boundaries)
