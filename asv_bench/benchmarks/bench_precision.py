"""Mixed precision: Adam on 16.7M elements with bfloat16 params (the mixed-precision targets).

``Formats.time_step`` times one step of each format of
``fastopt.apps.bench.PRECISION_ROWS`` (float32 Adam and torch's fused Adam on the
same bfloat16 params are two of them); ``Ratios.track_ratio`` reports each
16-bit format's time over its baseline's from one interleaved run in one
process (bare times taken in separate processes do not compare on a shared
machine), and ``track_bytes_per_element`` the bytes table row of the format.
"""

from fastopt.apps import bench as _bench

from .common import get_case

_FORMATS = {row[0]: row for row in _bench.PRECISION_ROWS}
_RATIO_FORMATS = [row[0] for row in _bench.PRECISION_ROWS if row[4] is not None]


class Formats:
    params = [list(_FORMATS)]
    param_names = ["format"]
    rounds = 1
    repeat = (3, 10, 2.0)
    warmup_time = 0
    timeout = 600

    def setup(self, fmt):
        _, impl, dtype, options, _, _ = _FORMATS[fmt]
        try:
            self.case = get_case(impl, "adam", [(_bench.PRECISION_N,)], dtype, options)
        except ImportError as e:  # bfloat16 needs ml_dtypes (the bf16 extra)
            raise NotImplementedError(str(e)) from None

    def time_step(self, fmt):
        self.case.step()

    def track_bytes_per_element(self, fmt):
        _, impl, dtype, options, _, _ = _FORMATS[fmt]
        return _bench.precision_bytes(dtype, {"state_dtype": "param"} if impl in _bench.PEER_IMPLS
                                      else options)

    track_bytes_per_element.unit = "bytes"


class Ratios:
    params = [_RATIO_FORMATS]
    param_names = ["format"]
    timeout = 900

    def setup_cache(self):
        return _bench.run_precision_bench(reps=7)

    def track_ratio(self, result, fmt):
        for row in result["rows"]:
            if row["format"] == fmt and row["ratio"] is not None:
                return row["ratio"]
        raise NotImplementedError(f"{fmt}: no ratio measured here (no torch?)")

    track_ratio.unit = "x baseline"
