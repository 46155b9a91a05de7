"""fastopt.torch: the adapter's step against torch.optim and against fastopt's raw API.

``AdapterStep`` times one ``optimizer.step()`` of Adam over three parameter sets
(the shapes of ``asv_bench/torch_adapter_ratio.py``, which prints the ratios
from one interleaved run): GPT-2 small's 148 tensors (124M elements), the
``demo --torch`` MLP, and 10 tensors of 256 elements.  ``impl`` puts
``fastopt.torch.Adam`` next to ``torch.optim.Adam(fused=True)`` and, for the
adapter's own overhead, the raw ``fastopt.Adam`` on NumPy views of the same
memory.  Every fastopt step uses ``nonfinite="ignore"``, like for like with
torch's fused step, which checks nothing without a GradScaler.  ``ten-q8``: 10
tensors of 4096 elements with ``state_dtype="q8"`` (8-bit moments: uint8 code and
float32 absmax tensors), adapter against the raw API only (torch has no 8-bit state).
"""

IMPLS = ("fastopt.torch", "torch-fused", "fastopt-raw")
SHAPES = ("gpt2-small", "demo-mlp", "ten-small", "ten-q8")


def shapes_of(name):
    d, v, ctx = 768, 50257, 1024
    if name == "gpt2-small":
        layer = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d),
                 (4 * d,), (4 * d, d), (d,)]
        return [(v, d), (ctx, d)] + layer * 12 + [(d,), (d,)]
    if name == "demo-mlp":
        sizes = (64, 128, 128, 10)
        return [s for a, b in zip(sizes, sizes[1:]) for s in ((b, a), (b,))]
    if name == "ten-q8":
        return [(4096,)] * 10
    return [(256,)] * 10


class AdapterStep:
    params = [list(IMPLS), list(SHAPES)]
    param_names = ["impl", "params"]
    rounds = 1
    repeat = (3, 20, 1.0)
    warmup_time = 0  # setup took one step already (JIT, state allocation)
    timeout = 300

    def setup(self, impl, params):
        try:
            import torch
        except ImportError:
            raise NotImplementedError("torch is not installed") from None
        import fastopt

        if params == "ten-q8" and impl == "torch-fused":
            raise NotImplementedError("torch.optim has no 8-bit state")
        extra = {"state_dtype": "q8"} if params == "ten-q8" else {}
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes_of(params)]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        if impl == "fastopt.torch":
            import fastopt.torch as ft

            self.step = ft.Adam(ps, lr=1e-3, nonfinite="ignore", **extra).step
        elif impl == "torch-fused":
            self.step = torch.optim.Adam(ps, lr=1e-3, fused=True).step
        else:
            arrays = [p.detach().numpy() for p in ps]
            grads = [p.grad.numpy() for p in ps]
            opt = fastopt.Adam(arrays, lr=1e-3, nonfinite="ignore", **extra)
            self.step = lambda: opt.step(grads)
        self.params = ps
        self.step()

    def teardown(self, impl, params):
        self.params = self.step = None

    def time_step(self, impl, params):
        self.step()
