"""The raw API on arrays of other frameworks: DLPack objects are wrapped over the same memory."""

import numpy as np
import pytest

import fastopt as fo
from fastopt._interop import as_native

torch = pytest.importorskip("torch")


class _DLPackOnly:
    """An object that exports its memory through DLPack and is nothing else."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kw):
        return self._a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_torch_tensors_are_updated_in_place(backend):
    """fo.Adam on torch CPU tensors writes the tensors themselves, as on NumPy views of them."""
    rng = np.random.default_rng(0)
    p0 = [rng.standard_normal(7).astype(np.float32), rng.standard_normal((3, 5)).astype(np.float32)]
    gs = [[rng.standard_normal(p.shape).astype(np.float32) for p in p0] for _ in range(3)]
    tensors = [torch.from_numpy(p.copy()) for p in p0]
    ptrs = [t.data_ptr() for t in tensors]
    want = [p.copy() for p in p0]
    a = fo.Adam(tensors, lr=1e-2, backend=backend)
    b = fo.Adam(want, lr=1e-2, backend=backend)
    for g in gs:
        a.step([torch.from_numpy(x) for x in g])   # grads as tensors too
        b.step(g)
    assert [t.data_ptr() for t in tensors] == ptrs
    for t, w in zip(tensors, want):
        np.testing.assert_array_equal(t.numpy(), w)


def test_dlpack_only_object_and_read_only_buffers():
    p = np.ones(4, np.float32)
    opt = fo.SGD([_DLPackOnly(p)], lr=0.5, backend="numpy")
    opt.step([_DLPackOnly(np.ones(4, np.float32))])
    np.testing.assert_array_equal(p, np.full(4, 0.5, np.float32))
    ro = np.ones(4, np.float32)
    ro.flags.writeable = False
    # a read-only grad is fine (only read); a read-only param is a clear error naming it
    fo.SGD([np.ones(4, np.float32)], lr=0.5, backend="numpy").step([_DLPackOnly(ro)])
    with pytest.raises(ValueError, match=r"params\[0\]"):
        fo.SGD([_DLPackOnly(ro)], lr=0.5, backend="numpy")


def test_a_single_tensor_is_not_split_into_rows():
    with pytest.raises(TypeError, match="single array"):
        fo.SGD(torch.zeros(3, 4), lr=0.1, backend="numpy")


def test_interop_wraps_dlpack_without_a_copy():
    t = torch.zeros(5)
    a = as_native(t, "params[0]", writeable=True)
    a += 2.0
    assert torch.equal(t, torch.full((5,), 2.0))
    base = np.arange(4.0)
    w = as_native(_DLPackOnly(base), "grads[0]")
    assert np.shares_memory(w, base)
    already = np.zeros(3)
    assert as_native(already, "params[0]") is already


def test_interop_read_only_buffers():
    ro = np.arange(3.0)
    ro.flags.writeable = False
    got = as_native(_DLPackOnly(ro), "grads[0]")  # read: fine
    assert not got.flags.writeable and np.shares_memory(got, ro)
    with pytest.raises(ValueError, match=r"params\[0\]: expected a writeable array.*read-only"):
        as_native(_DLPackOnly(ro), "params[0]", writeable=True)
    with pytest.raises(TypeError, match=r"params\[1\].*detach"):
        as_native(torch.zeros(2, requires_grad=True), "params[1]")
