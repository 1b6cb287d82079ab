"""aux_pool against F.adaptive_avg_pool2d: values, gradients, layouts, opcheck, errors."""


import pytest
import torch
import torch.nn.functional as F

from dgl_fast import ops
from helpers import in_layout

# --- aux_pool --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,out", [((2, 3, 8, 8), (2, 2)), ((3, 5, 7, 9), (2, 3)), ((4, 6, 5, 5), (2, 2)),
                                       ((2, 4, 13, 11), (4, 3)), ((1, 2, 1, 1), (2, 2))])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("channels_last_out", [False, True])
def test_aux_pool_matches_adaptive_avg_pool(device, shape, out, layout, channels_last_out):
    torch.manual_seed(0)
    x = in_layout(torch.randn(shape, device=device), layout)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    ya = ops.aux_pool(a, out, channels_last_out)
    yb = F.adaptive_avg_pool2d(b, out)
    torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)
    assert ya.is_contiguous(memory_format=torch.channels_last if channels_last_out else torch.contiguous_format)
    g = torch.randn_like(yb)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)
    if layout == "channels_last" and shape[2] * shape[3] > 1 and shape[1] > 1:  # the gradient keeps the layout
        assert a.grad.is_contiguous(memory_format=torch.channels_last) and not a.grad.is_contiguous()


def test_aux_pool_gradcheck_float64():
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.aux_pool(t, (3, 2)), (x,))
    xc = torch.randn(2, 3, 6, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.aux_pool(t, (2, 2), True), (xc,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_aux_pool_opcheck(device, dtype):
    x = torch.randn(3, 4, 9, 7, device=device, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.dgl_fast.aux_pool.default, (x, 2, 3, True))
    g = torch.randn(3, 4, 2, 3, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.dgl_fast.aux_pool_bwd.default, (g, 9, 7, False))


def test_aux_pool_bad_input():
    with pytest.raises(RuntimeError, match=r"aux_pool: expected features of shape \[B, C, H, W\], got \[2, 3, 4\]"):
        ops.aux_pool(torch.randn(2, 3, 4), (2, 2))
    with pytest.raises(RuntimeError, match="expected a positive output size"):
        ops.aux_pool(torch.randn(2, 3, 4, 4), (0, 2))
