"""The fused AuxHead path (aux_pool, linear_bn_relu, bn_update_stats, softmax_xent together) against
the plain-PyTorch head: values, gradients, BatchNorm running statistics, dtypes, layouts, errors.
Each op alone: tests/test_<op>.py."""

import copy

import pytest
import torch
import torch.nn.functional as F

from dgl_fast import AuxHead
from helpers import assert_within_2x, in_layout

# (C, s) of every stage output of VGG-13 K=4 and of the aux-study net, at CIFAR size.
VGG13_K4 = [(128, 16), (256, 8), (512, 2)]
AUX_STUDY = [(128, 32), (256, 16), (512, 8)]


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
