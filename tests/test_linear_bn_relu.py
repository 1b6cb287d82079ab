"""linear_bn_relu against plain PyTorch: values, gradients, batch statistics, dtypes (the 2x rule), opcheck, errors."""


import pytest
import torch

from dgl_fast import ops, reference
from helpers import assert_within_2x

# --- linear_bn_relu ----------------------------------------------------------------------------


def _linear_bn_relu_inputs(N, K, M, dtype=torch.float32, device="cpu", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32

    def r(*s, dt=dtype):
        return torch.randn(*s, generator=g).to(device=device, dtype=dt)

    x, w = r(N, K), r(M, K) / K**0.5
    b = r(M) if bias else None
    gamma, beta = (1 + 0.5 * r(M, dt=sdt)), r(M, dt=sdt)
    rm, rv = r(M, dt=sdt), (0.5 + torch.rand(M, generator=g)).to(device=device, dtype=sdt)
    return x, w, b, gamma, beta, rm, rv


@pytest.mark.parametrize("N,K,M", [(2, 3, 5), (3, 16, 7), (128, 64, 33), (1000, 12, 40)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_bn_relu_matches_reference(device, N, K, M, training, bias):
    inputs = _linear_bn_relu_inputs(N, K, M, device=device, bias=bias)
    x, w, b, gamma, beta, rm, rv = inputs
    g = torch.randn(N, M, device=device)
    results = {}
    for name, fn, dt in (("ours", ops.linear_bn_relu, torch.float32), ("torch", reference.linear_bn_relu, torch.float32),
                         ("exact", reference.linear_bn_relu, torch.float64)):
        leaves = [t.detach().to(dt).requires_grad_() for t in (x, w, gamma, beta)]
        bias_ = b.detach().to(dt).requires_grad_() if bias else None
        out, mean, var = fn(leaves[0], leaves[1], bias_, leaves[2], leaves[3], rm.to(dt), rv.to(dt), training)
        out.backward(g.to(dt))
        grads = [t.grad for t in leaves] + ([bias_.grad] if bias else [])
        results[name] = [out, mean, var] + grads
    names = ["out", "mean", "var", "grad_x", "grad_w", "grad_gamma", "grad_beta", "grad_bias"]
    scale = max(e.abs().max().item() for e in results["exact"][3:])
    for i, (a, t, e) in enumerate(zip(results["ours"], results["torch"], results["exact"])):
        assert a.dtype == t.dtype
        assert_within_2x(a, t, e, names[i], scale if i >= 3 else None)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_bn_relu_gradcheck_float64(training, bias):
    x, w, b, gamma, beta, rm, rv = _linear_bn_relu_inputs(7, 4, 3, dtype=torch.float64, bias=bias, seed=2)
    leaves = [t.requires_grad_() for t in (x, w, gamma, beta)] + ([b.requires_grad_()] if bias else [])

    def fn(xx, ww, gg, bb, *bias_):
        return ops.linear_bn_relu(xx, ww, bias_[0] if bias_ else None, gg, bb, rm, rv, training)[0]

    assert torch.autograd.gradcheck(fn, tuple(leaves))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_bn_relu_opcheck(device, dtype):
    x, w, b, gamma, beta, rm, rv = _linear_bn_relu_inputs(9, 6, 5, dtype=dtype, device=device)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), gamma.requires_grad_(), beta.requires_grad_(),
            rm, rv, True, 1e-5)
    torch.library.opcheck(torch.ops.dgl_fast.linear_bn_relu.default, args)
    out, z, mean, var = torch.ops.dgl_fast.linear_bn_relu(*args)
    torch.library.opcheck(torch.ops.dgl_fast.linear_bn_relu_bwd.default,
                          (torch.randn_like(out), x.detach(), w.detach(), z, mean, var, gamma.detach(), beta.detach(),
                           True, 1e-5))


def test_linear_bn_relu_bad_input():
    x, w, b, gamma, beta, rm, rv = _linear_bn_relu_inputs(4, 3, 5)
    with pytest.raises(RuntimeError, match=r"expected weight of shape \[M, 3\], got \[5, 4\]"):
        ops.linear_bn_relu(x, torch.randn(5, 4), b, gamma, beta, rm, rv, True)
    with pytest.raises(RuntimeError, match="expected input and weight of the same floating dtype"):
        ops.linear_bn_relu(x.double(), w, b, gamma, beta, rm, rv, True)
    with pytest.raises(RuntimeError, match=r"expected more than 1 value per channel when training"):
        ops.linear_bn_relu(x[:1], w, b, gamma, beta, rm, rv, True)
    with pytest.raises(RuntimeError, match=r"expected BatchNorm weight of shape \[5\], got \[4\]"):
        ops.linear_bn_relu(x, w, b, gamma[:4], beta, rm, rv, True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_bn_relu_low_precision_within_2x(device, dtype):
    if device.type == "cpu" and dtype == torch.float16:
        pytest.skip("fp16 matrix products are a CUDA feature here")
    x, w, b, gamma, beta, rm, rv = _linear_bn_relu_inputs(64, 48, 40, device=device)
    g = torch.randn(64, 40, device=device)
    res = {}
    for name, fn, dt in (("ours", ops.linear_bn_relu, dtype), ("torch", reference.linear_bn_relu, dtype),
                         ("exact", reference.linear_bn_relu, torch.float64)):
        sdt = torch.float64 if dt == torch.float64 else torch.float32
        leaves = [x.to(dt).requires_grad_(), w.to(dt).requires_grad_(), b.to(dt).requires_grad_()]
        out, mean, var = fn(leaves[0], leaves[1], leaves[2], gamma.to(sdt), beta.to(sdt), rm.to(sdt), rv.to(sdt), True)
        out.backward(g.to(out.dtype))
        res[name] = [out, mean, leaves[0].grad, leaves[1].grad]
    assert res["ours"][0].dtype == dtype and res["ours"][1].dtype == torch.float32
    for i, what in enumerate(["out", "mean", "grad_x", "grad_w"]):
        assert_within_2x(res["ours"][i], res["torch"][i], res["exact"][i], what)
