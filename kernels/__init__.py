"""The hand-written kernels, one module per backend (installed as ``fastopt.kernels``).

* ``reference`` — the NumPy reference: the definition of correct.
* ``numba_cpu`` — fused, multi-threaded Numba kernels.
* ``cupy_gpu`` and ``cuda/`` — CUDA C sources loaded through ``cupy.RawModule``.

Each backend module registers its kernels with ``fastopt._backend`` when
imported; nothing here is imported by ``import fastopt``.
"""
