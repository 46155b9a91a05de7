"""One optimizer step: every rule x backend x dtype x size, and the peers side by side.

``Step`` is fastopt alone (numpy, numba, cupy).  ``Peers`` puts fastopt's
backends next to a naive NumPy expression version and torch.optim
(``fused=True``, ``foreach=True``) in one parameter, ``impl``, so that one
graph of the dashboard shows fastopt and its competitors side by side; it runs
Adam and SGD, the rules every peer has (``bench_bandwidth`` covers every
rule torch has).  Every step uses the rule's default options
(``fastopt.apps.benchkit.BENCH_OPTIONS`` lowers a few learning rates so that
millions of steps stay finite) and ``nonfinite="ignore"``: the fused pass
alone, as torch.optim does no such check (``bench_clip.Pipeline`` prices it).
"""

from .common import (DTYPES, ELEMENTWISE_RULES, FASTOPT_IMPLS, IMPLS, NAIVE_RULES, SIZES,
                     get_case)


class Step:
    params = [list(ELEMENTWISE_RULES), list(FASTOPT_IMPLS), list(DTYPES), list(SIZES)]
    param_names = ["rule", "backend", "dtype", "n"]
    # one round; at least 3 samples, at most 20, and stop sampling after ~1 s (a
    # 16M-element NumPy step is 0.1-0.5 s): the whole grid must finish in minutes
    rounds = 1
    repeat = (3, 20, 1.0)
    warmup_time = 0  # setup took one step already (JIT, page faults)
    timeout = 300

    def setup(self, rule, backend, dtype, n):
        self.case = get_case(backend, rule, [(n,)], dtype)

    def time_step(self, rule, backend, dtype, n):
        self.case.step()
        self.case.sync()


class Peers:
    params = [list(NAIVE_RULES), list(IMPLS), list(SIZES)]
    param_names = ["rule", "impl", "n"]
    rounds = 1
    repeat = (3, 20, 1.0)
    warmup_time = 0  # setup took one step already (JIT, page faults)
    timeout = 300

    def setup(self, rule, impl, n):
        self.case = get_case(impl, rule, [(n,)], "float32")

    def time_step(self, rule, impl, n):
        self.case.step()
        self.case.sync()


class Newton:
    """Damped Newton: a dense solve per tensor, so n is the tensor's size (H is n x n)."""

    params = [list(FASTOPT_IMPLS), list(DTYPES), [16, 128, 512]]
    param_names = ["backend", "dtype", "n"]
    rounds = 1
    repeat = (3, 20, 1.0)
    warmup_time = 0  # setup took one step already (JIT, page faults)

    def setup(self, backend, dtype, n):
        self.case = get_case(backend, "newton", [(n,)], dtype)

    def time_step(self, backend, dtype, n):
        self.case.step()
        self.case.sync()


class Muon:
    """Muon on one n x n matrix: momentum, 5 Newton-Schulz iterations (matrix products), update.

    ``impl`` "torch" is torch.optim.Muon on the CPU (its products in bfloat16, very slow on a
    CPU without bfloat16 matrix units: the 4096 row may need the whole timeout).
    ``python -m fastopt bench --muon 4096`` gives the interleaved fastopt/torch ratio.
    """

    params = [["numpy", "numba", "torch"], ["float32"], [1024, 4096]]
    param_names = ["impl", "dtype", "n"]
    rounds = 1
    repeat = (1, 3, 10.0)
    number = 1
    warmup_time = 0
    timeout = 1800

    def setup(self, impl, dtype, n):
        import numpy as np

        from fastopt.apps.bench import Case, torch_module, unavailable

        if impl == "torch":
            torch = torch_module()
            if torch is None or not hasattr(torch.optim, "Muon"):
                raise NotImplementedError("torch.optim.Muon is not installed")
            rng = np.random.default_rng(0)
            p = torch.from_numpy(rng.random((n, n), dtype=np.float32) - 0.5)
            p.grad = torch.from_numpy(rng.random((n, n), dtype=np.float32) - 0.5)
            self.step = torch.optim.Muon([p], lr=0.02).step
        else:
            why = unavailable(impl, "muon")
            if why:
                raise NotImplementedError(why)
            self.step = Case(impl, "muon", [(n, n)], dtype, {"lr": 0.02}).step
        self.step()  # compile, first touch

    def time_step(self, impl, dtype, n):
        self.step()


class LBFGS:
    """One LBFGS step (max_iter=5, history 10, no line search) on a separable quadratic of n
    elements: the closure is one multiply, so the step's own vector work dominates.
    ``impl`` "numba" is the fused two-loop (kernels/numba_cpu.py, ``_k_axpy_dot``)."""

    params = [["numpy", "numba", "torch"], [100_000, 1_000_000]]
    param_names = ["impl", "n"]
    rounds = 1
    repeat = (3, 10, 5.0)
    number = 1
    warmup_time = 0

    def setup(self, impl, n):
        import numpy as np

        rng = np.random.default_rng(0)
        scale = rng.random(n) + 0.5
        x0 = rng.standard_normal(n)
        opts = dict(max_iter=5, history_size=10, tolerance_grad=0.0, tolerance_change=0.0)
        if impl == "torch":
            from fastopt.apps.bench import torch_module

            torch = torch_module()
            if torch is None:
                raise NotImplementedError("torch is not installed")
            p = torch.tensor(x0, requires_grad=True)
            s = torch.from_numpy(scale)
            opt = torch.optim.LBFGS([p], **opts)

            def closure():
                opt.zero_grad()
                loss = 0.5 * torch.sum(s * p * p)
                loss.backward()
                return loss

            self.step = lambda: opt.step(closure)
        else:
            import fastopt as fo

            if impl == "numba" and not fo.backends()["numba"]["available"]:
                raise NotImplementedError(fo.backends()["numba"]["reason"])
            p = x0.copy()
            opt = fo.LBFGS([p], backend=impl, **opts)
            self.step = lambda: opt.step(lambda: (0.5 * float(np.dot(scale * p, p)), [scale * p]))
        self.step()  # compile, first touch

    def time_step(self, impl, n):
        self.step()


class SparseAdam:
    """One SparseAdam step on a 100000 x 64 float32 embedding table, 4096 looked-up rows
    (about 1 in 4 repeated)."""

    params = [["numpy", "numba", "torch"]]
    param_names = ["impl"]
    rounds = 1
    repeat = (3, 20, 2.0)
    warmup_time = 0

    def setup(self, impl):
        import numpy as np

        rng = np.random.default_rng(0)
        rows, dim, nnz = 100_000, 64, 4096
        table = rng.standard_normal((rows, dim), dtype=np.float32)
        idx = rng.integers(0, rows, nnz)
        idx[::4] = idx[1::4]
        vals = rng.standard_normal((nnz, dim), dtype=np.float32)
        if impl == "torch":
            from fastopt.apps.bench import torch_module

            torch = torch_module()
            if torch is None:
                raise NotImplementedError("torch is not installed")
            p = torch.from_numpy(table)
            p.grad = torch.sparse_coo_tensor(torch.from_numpy(idx)[None], torch.from_numpy(vals),
                                             (rows, dim))
            self.step = torch.optim.SparseAdam([p]).step
        else:
            import fastopt as fo

            if impl == "numba" and not fo.backends()["numba"]["available"]:
                raise NotImplementedError(fo.backends()["numba"]["reason"])
            opt = fo.SparseAdam([table], backend=impl, nonfinite="ignore")
            self.step = lambda: opt.step([(idx, vals)])
        self.step()  # compile, first touch

    def time_step(self, impl):
        self.step()


class Adafactor:
    """Adafactor on one n x n float32 matrix: the row/column sums, the RMS pass and the update
    (three reads of the grad), against torch.optim.Adafactor on the CPU."""

    params = [["numpy", "numba", "torch"], [1024, 4096]]
    param_names = ["impl", "n"]
    rounds = 1
    number = 1
    timeout = 600

    def setup(self, impl, n):
        import numpy as np

        rng = np.random.default_rng(0)
        p = rng.random((n, n), dtype=np.float32) - 0.5
        g = rng.random((n, n), dtype=np.float32) - 0.5
        if impl == "torch":
            from fastopt.apps.bench import torch_module

            torch = torch_module()
            if torch is None or not hasattr(torch.optim, "Adafactor"):
                raise NotImplementedError("torch.optim.Adafactor is not installed")
            tp = torch.from_numpy(p)
            tp.grad = torch.from_numpy(g)
            self.step = torch.optim.Adafactor([tp]).step
        else:
            import fastopt as fo

            if not fo._backend.available(impl):
                raise NotImplementedError(f"backend {impl!r} is not available")
            opt = fo.Adafactor([p], backend=impl)
            self.step = lambda: opt.step([g])
        self.step()  # compile, first touch

    def time_step(self, impl, n):
        self.step()
