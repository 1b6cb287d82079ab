"""Fused auxiliary-head ops (aux_pool, linear_bn_relu, bn_update_stats) and the fused AuxHead path
against plain PyTorch: values, gradients, BatchNorm running statistics, dtypes, layouts, errors."""

import copy

import pytest
import torch
import torch.nn.functional as F

from dgl_fast import AuxHead, ops, reference
from helpers import in_layout

# (C, s) of every stage output of VGG-13 K=4 and of the aux-study net, at CIFAR size.
VGG13_K4 = [(128, 16), (256, 8), (512, 2)]
AUX_STUDY = [(128, 32), (256, 16), (512, 8)]


def assert_within_2x(ours, theirs, exact, what="", scale=None):
    """The numerics rule: our error against a float64 result is at most twice the error of plain
    PyTorch in the same precision. Errors below 1e-5 of `scale` (default: the largest exact value)
    are ignored: quantities that are mathematically zero (e.g. the gradient of a BatchNorm shift
    that the next BatchNorm cancels) are pure rounding noise on both sides."""
    exact = exact.double()
    err_ours = (ours.double() - exact).abs().max().item()
    err_torch = (theirs.double() - exact).abs().max().item()
    floor = 1e-5 * (scale if scale is not None else exact.abs().max().item())
    assert err_ours <= 2 * err_torch + floor, f"{what}: error {err_ours:.3g} vs PyTorch's {err_torch:.3g}"


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


# --- linear_bn_relu ----------------------------------------------------------------------------


def _lbr_inputs(N, K, M, dtype=torch.float32, device="cpu", bias=True, seed=0):
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
    inputs = _lbr_inputs(N, K, M, device=device, bias=bias)
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
    x, w, b, gamma, beta, rm, rv = _lbr_inputs(7, 4, 3, dtype=torch.float64, bias=bias, seed=2)
    leaves = [t.requires_grad_() for t in (x, w, gamma, beta)] + ([b.requires_grad_()] if bias else [])

    def fn(xx, ww, gg, bb, *bias_):
        return ops.linear_bn_relu(xx, ww, bias_[0] if bias_ else None, gg, bb, rm, rv, training)[0]

    assert torch.autograd.gradcheck(fn, tuple(leaves))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_bn_relu_opcheck(device, dtype):
    x, w, b, gamma, beta, rm, rv = _lbr_inputs(9, 6, 5, dtype=dtype, device=device)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), gamma.requires_grad_(), beta.requires_grad_(),
            rm, rv, True, 1e-5)
    torch.library.opcheck(torch.ops.dgl_fast.linear_bn_relu.default, args)
    out, z, mean, var = torch.ops.dgl_fast.linear_bn_relu(*args)
    torch.library.opcheck(torch.ops.dgl_fast.linear_bn_relu_bwd.default,
                          (torch.randn_like(out), x.detach(), w.detach(), z, mean, var, gamma.detach(), beta.detach(),
                           True, 1e-5))


def test_bn_update_stats_matches_batchnorm(device):
    torch.manual_seed(3)
    bns = [torch.nn.BatchNorm1d(m, momentum=mom).to(device) for m, mom in ((5, 0.1), (7, 0.3))]
    refs = copy.deepcopy(bns)
    for bn in bns + refs:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    refs = copy.deepcopy(bns)
    xs = [torch.randn(11, 5, device=device), torch.randn(4, 7, device=device)]
    for bn, x in zip(refs, xs):
        bn(x)
    means = [x.mean(0) for x in xs]
    vars_ = [x.var(0, unbiased=False) for x in xs]
    args = ([bn.running_mean for bn in bns], [bn.running_var for bn in bns], [bn.num_batches_tracked for bn in bns],
            means, vars_, [11, 4], [0.1, 0.3])
    torch.library.opcheck(torch.ops.dgl_fast.bn_update_stats.default, args, test_utils=("test_schema",))
    ops.bn_update_stats(*args)
    for bn, ref in zip(bns, refs):
        torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-6, atol=1e-6)
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 1


def test_linear_bn_relu_bad_input():
    x, w, b, gamma, beta, rm, rv = _lbr_inputs(4, 3, 5)
    with pytest.raises(RuntimeError, match=r"expected weight of shape \[M, 3\], got \[5, 4\]"):
        ops.linear_bn_relu(x, torch.randn(5, 4), b, gamma, beta, rm, rv, True)
    with pytest.raises(RuntimeError, match="expected input and weight of the same floating dtype"):
        ops.linear_bn_relu(x.double(), w, b, gamma, beta, rm, rv, True)
    with pytest.raises(RuntimeError, match=r"expected more than 1 value per channel when training"):
        ops.linear_bn_relu(x[:1], w, b, gamma, beta, rm, rv, True)
    with pytest.raises(RuntimeError, match=r"expected BatchNorm weight of shape \[5\], got \[4\]"):
        ops.linear_bn_relu(x, w, b, gamma[:4], beta, rm, rv, True)


# --- the fused AuxHead -------------------------------------------------------------------------


def _compare_head(kind, C, s, B, device, layout="nchw", hidden=None, steps=2):
    """Fused head vs its to_reference() over `steps` training steps (the second starts from updated
    running statistics), then in eval mode.

    Batches of 2 and 3 make BatchNorm1d ill-conditioned (two samples normalise to +-1): any two
    float32 implementations then differ by amplified rounding noise, so there the fused head runs
    in float64 and must match the float64 reference to 1e-9. Larger batches run in float32 under
    the 2x-of-PyTorch error rule against float64."""
    torch.manual_seed(C + s + B)
    fused = AuxHead(C, s, 10, kind=kind, hidden=hidden, fused=True).to(device)
    assert fused.uses_fused_ops()
    if B <= 3:
        _compare_head_float64(fused, B, device, layout, steps)
        return
    plain = copy.deepcopy(fused).to_reference()
    exact = copy.deepcopy(fused).double().to_reference()
    for _ in range(steps):
        x = in_layout(torch.randn(B, C, s, s, device=device), layout)
        y = torch.randint(0, 10, (B,), device=device)
        outs = {}
        for name, fn, dt in (("ours", fused.loss, torch.float32), ("torch", plain, torch.float32),
                             ("exact", exact, torch.float64)):
            xx = x.detach().to(dt).requires_grad_()
            if name == "ours":
                loss, correct = fn(xx, y)
            else:
                logits = fn(xx)
                loss, correct = F.cross_entropy(logits, y), (logits.argmax(1) == y).sum()
            loss.backward()
            module = fused if name == "ours" else (plain if name == "torch" else exact)
            outs[name] = (loss, correct, xx.grad, [p.grad for p in module.parameters()], list(module.buffers()))
            for p in module.parameters():
                p.grad = None
        (lo, co, gxo, gpo, bo), (lt, ct, gxt, gpt, bt), (le, ce, gxe, gpe, be) = (outs[k] for k in ("ours", "torch", "exact"))
        assert_within_2x(lo, lt, le, "loss")
        assert int(co) == int(ct) or abs(int(co) - int(ce)) <= abs(int(ct) - int(ce)) + 1
        assert_within_2x(gxo, gxt, gxe, "input gradient")
        scale = max(e.abs().max().item() for e in gpe)
        for i, (a, t, e) in enumerate(zip(gpo, gpt, gpe)):
            assert_within_2x(a, t, e, f"gradient of parameter {i}", scale)
        for a, t in zip(bo, bt):  # running statistics and num_batches_tracked, as nn.BatchNorm keeps them
            torch.testing.assert_close(a, t, rtol=1e-5, atol=1e-6)
    for m in (fused, plain, exact):
        m.eval()
    x = torch.randn(B, C, s, s, device=device)
    assert_within_2x(fused(x), plain(x), exact(x.double()), "eval logits")


def _compare_head_float64(fused, B, device, layout, steps):
    fused = fused.double()
    ref = copy.deepcopy(fused)
    ref_seq = ref.to_reference()
    C, (s, _) = fused.in_channels, fused.in_size
    for _ in range(steps):
        x = in_layout(torch.randn(B, C, s, s, device=device, dtype=torch.float64), layout)
        y = torch.randint(0, 10, (B,), device=device)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss, correct = fused.loss(xa, y)
        logits = ref_seq(xb)
        loss_ref = F.cross_entropy(logits, y)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-9, atol=1e-9)
        assert int(correct) == int((logits.argmax(1) == y).sum())
        loss.backward()
        loss_ref.backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-7)
        for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
            p.grad = q.grad = None
        for a, b in zip(fused.buffers(), ref.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    fused.eval()
    ref.eval()
    x = torch.randn(B, C, s, s, device=device, dtype=torch.float64)
    torch.testing.assert_close(fused(x), ref_seq(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["mlp-sr", "mlp", "last"])
@pytest.mark.parametrize("C,s", [(8, 5), (6, 9), (4, 2), (3, 7)])
@pytest.mark.parametrize("B", [2, 3, 17])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
def test_fused_head_equals_reference_small(device, kind, C, s, B, layout):
    _compare_head(kind, C, s, B, device, layout, hidden=24)


@pytest.mark.parametrize("kind", ["mlp-sr", "mlp", "last"])
@pytest.mark.parametrize("C,s", VGG13_K4 + AUX_STUDY)
@pytest.mark.parametrize("B", [2, 3, 128])
def test_fused_head_equals_reference_paper_shapes(device, kind, C, s, B):
    if device.type == "cpu" and C * s * s * B > 256 * 16 * 16 * 3:
        pytest.skip("large paper shapes run on CUDA; the CPU runs the small ones")
    _compare_head(kind, C, s, B, device, steps=1)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["mlp-sr", "mlp", "last"])
@pytest.mark.parametrize("C,s", VGG13_K4 + AUX_STUDY)
def test_fused_head_batch_1000_cuda(kind, C, s):
    _compare_head(kind, C, s, 1000, torch.device("cuda"), steps=1)


def test_fused_head_float64_tight():
    torch.manual_seed(0)
    fused = AuxHead(6, 9, 10, kind="mlp-sr", hidden=20, fused=True).double()
    ref = copy.deepcopy(fused).to_reference()
    x = torch.randn(5, 6, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_head_autocast_within_2x_of_pytorch(device, dtype):
    if device.type == "cpu" and dtype == torch.float16:
        pytest.skip("CPU autocast runs bfloat16")
    torch.manual_seed(1)
    head = AuxHead(32, 8, 10, kind="mlp-sr", fused=True).to(device)
    exact = copy.deepcopy(head).double().to_reference()
    plain = copy.deepcopy(head).to_reference()
    x = torch.randn(16, 32, 8, 8, device=device)
    want = exact(x.double())
    with torch.autocast(device.type, dtype=dtype):
        ours = head(x)
        theirs = plain(x)
    assert ours.dtype == theirs.dtype == dtype
    for m in head.modules():  # statistics and BN parameters stay float32
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            assert m.running_mean.dtype == torch.float32 and m.weight.dtype == torch.float32
    err_ours = (ours.double() - want).abs().max().item()
    err_torch = (theirs.double() - want).abs().max().item()
    assert err_ours <= 2 * err_torch + 1e-3


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["mlp-sr", "mlp", "last"])
def test_fused_head_in_cuda_graph_equals_eager(kind):
    dev = torch.device("cuda")
    torch.manual_seed(2)
    head = AuxHead(64, 8, 10, kind=kind, fused=True).to(dev)
    twin = copy.deepcopy(head)
    static_x = torch.randn(32, 64, 8, 8, device=dev)
    static_y = torch.randint(0, 10, (32,), device=dev)
    params = list(head.parameters())

    def step():
        loss, correct = head.loss(static_x, static_y)
        grads = torch.autograd.grad(loss, params)
        return loss, correct, grads

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up (also advances the running statistics once)
    torch.cuda.current_stream().wait_stream(s)
    twin_state = copy.deepcopy(head.state_dict())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    twin.load_state_dict(twin_state)  # capture did not run the kernels
    for seed in range(3):
        gen = torch.Generator(device=dev).manual_seed(seed)
        static_x.copy_(torch.randn(static_x.shape, device=dev, generator=gen))
        static_y.copy_(torch.randint(0, 10, static_y.shape, device=dev, generator=gen))
        g.replay()
        loss, correct = twin.loss(static_x, static_y)
        grads = torch.autograd.grad(loss, list(twin.parameters()))
        torch.testing.assert_close(out[0], loss)
        assert int(out[1]) == int(correct)
        for a, b in zip(out[2], grads):
            torch.testing.assert_close(a, b)
        for a, b in zip(head.buffers(), twin.buffers()):
            torch.testing.assert_close(a, b)


def test_fused_head_bad_input():
    head = AuxHead(8, 4, 10, kind="mlp", fused=True)
    with pytest.raises(ValueError, match=r"expected features of shape \[B, 8, 4, 4\], got \[3, 7, 4, 4\]"):
        head(torch.randn(3, 7, 4, 4))
    with pytest.raises(ValueError, match=r"expected features of shape \[B, 8, 4, 4\], got \[3, 8, 5, 4\]"):
        head(torch.randn(3, 8, 5, 4))
    with pytest.raises(ValueError, match="expected features of dtype torch.float32 like its parameters, got torch.float64"):
        head(torch.randn(3, 8, 4, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="expected more than 1 value per channel when training"):
        head(torch.randn(1, 8, 4, 4))
    with pytest.raises(RuntimeError, match=r"expected labels in \[0, 10\), got 10"):
        head.loss(torch.randn(3, 8, 4, 4), torch.tensor([1, 10, 2]))
    before = [b.clone() for b in head.buffers()]
    with pytest.raises(ValueError):
        head(torch.randn(3, 7, 4, 4))
    assert all(torch.equal(a, b) for a, b in zip(head.buffers(), before))


@pytest.mark.cuda
def test_fused_head_device_mismatch():
    head = AuxHead(8, 4, 10, kind="mlp", fused=True).cuda()
    with pytest.raises(ValueError, match="expected features on cuda:0 like its parameters, got cpu"):
        head(torch.randn(3, 8, 4, 4))


def test_fused_auto_means_cuda_only(device):
    head = AuxHead(8, 4, 10, kind="mlp").to(device)  # fused="auto"
    assert head.uses_fused_ops() == (device.type == "cuda")
    assert AuxHead(8, 4, 10, kind="mlp", fused=True).to(device).uses_fused_ops()
    with pytest.raises(ValueError, match="fused must be True, False or 'auto', got 'yes'"):
        AuxHead(8, 4, 10, fused="yes")


def test_fallbacks_to_plain_pytorch():
    assert not AuxHead(8, 4, 10, kind="cnn", fused=True).uses_fused_ops()
    assert not AuxHead(8, 4, 10, kind="mlp", fused=False).uses_fused_ops()
    head = AuxHead(8, 4, 10, kind="mlp", fused=True)
    next(m for m in head.layers if isinstance(m, torch.nn.BatchNorm1d)).momentum = None  # cumulative average: not fused
    assert not head.uses_fused_ops()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_bn_relu_low_precision_within_2x(device, dtype):
    if device.type == "cpu" and dtype == torch.float16:
        pytest.skip("fp16 matrix products are a CUDA feature here")
    x, w, b, gamma, beta, rm, rv = _lbr_inputs(64, 48, 40, device=device)
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


def test_fused_head_traces_under_torch_compile():
    # fake kernels + registered autograd let the whole fused head trace as one graph
    torch.manual_seed(0)
    head = AuxHead(8, 6, 10, kind="mlp-sr", fused=True)
    twin = copy.deepcopy(head)
    compiled = torch.compile(lambda x, y: head.loss(x, y)[0], backend="aot_eager", fullgraph=True)
    x, y = torch.randn(5, 8, 6, 6), torch.randint(0, 10, (5,))
    loss = compiled(x, y)
    loss.backward()
    ref, _ = twin.loss(x, y)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for p, q in zip(head.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    for a, b in zip(head.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b)
