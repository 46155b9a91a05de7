"""One step over a list of tensors: GPT-2 small (148 tensors, 124M elements) and 1000 x 256.

The first is bandwidth-bound (about 2 GB of float32 params, grads and Adam
state); the second is all per-tensor overhead, which a multi-tensor kernel
exists to remove.
"""

from .common import IMPLS, LAYOUTS, get_case


class MultiTensor:
    params = [["adam", "sgd"], list(IMPLS), list(LAYOUTS)]
    param_names = ["rule", "impl", "layout"]
    # a GPT-2-sized NumPy step takes seconds: one round, three samples
    rounds = 1
    repeat = (3, 10, 2.0)
    warmup_time = 0  # setup took one step already (JIT, page faults)
    timeout = 600

    def setup(self, rule, impl, layout):
        self.case = get_case(impl, rule, LAYOUTS[layout], "float32")

    def time_step(self, rule, impl, layout):
        self.case.step()
        self.case.sync()
