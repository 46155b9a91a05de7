"""8-bit block-quantized state (state_dtype="q8") on the numba backend, and its peer.

Plain times for asv to track between commits; the ratios (q8 over float32 Adam,
bitsandbytes over q8) come from one interleaved run: ``asv_bench/q8_numba.py``.
"""

from fastopt.apps import bench as _bench

N16 = 16_777_216


class Q8AdamStep:
    """One Adam step on 16.7M params (numba kernel): float32 params with q8 or float32 state,
    and bfloat16 params with q8 state and stochastic rounding ("bf16-q8-sr", ~10 bytes/elem)."""

    params = [["q8", "float32", "bf16-q8-sr"]]
    param_names = ["state"]
    timeout = 300

    def setup(self, state):
        param = "bfloat16" if state == "bf16-q8-sr" else "float32"
        state = "q8" if state == "bf16-q8-sr" else state
        # NotImplementedError (numba missing): skipped
        self.case = _bench.Q8KernelStep("adam", N16, state, param=param)
        self.case.step()  # compile, first touch

    def time_step(self, state):
        self.case.step()


class Bnb8bitAdamStep:
    """The optional peer: bitsandbytes' ``Adam8bit`` on CPU tensors (skipped when not installed)."""

    timeout = 300

    def setup(self):
        self.step = _bench.bnb_adam8bit_step(N16)
        self.step()

    def time_step(self):
        self.step()
