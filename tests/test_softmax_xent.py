"""dgl_fast::softmax_xent against its plain-PyTorch reference, opcheck and gradcheck."""

import pytest
import torch

import dgl_fast
from dgl_fast import ops, reference

SHAPES = [(1, 2), (3, 10), (7, 13), (128, 10), (129, 1000), (1000, 10), (33, 37)]


def _inputs(shape, dtype, device, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    B, C = shape
    if noncontig:
        logits = (3 * torch.randn(C, B, generator=g)).t()  # a transposed, non-contiguous view
    else:
        logits = 3 * torch.randn(B, C, generator=g)
    labels = torch.randint(0, C, (B,), generator=g)
    return logits.to(device=device, dtype=dtype), labels.to(device)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("noncontig", [False, True])
def test_matches_reference_fp32(device, shape, noncontig):
    logits, labels = _inputs(shape, torch.float32, device, noncontig=noncontig)
    loss, grad, correct = torch.ops.dgl_fast.softmax_xent(logits, labels)
    rloss, rgrad, rcorrect = reference.softmax_xent(logits.double(), labels)
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-5, atol=1e-7)
    assert int(correct) == int(rcorrect)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32 and correct.dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 10), (128, 10), (65, 100)])
def test_low_precision_within_2x_of_pytorch(device, dtype, shape):
    logits, labels = _inputs(shape, dtype, device, seed=1)
    loss, grad, correct = torch.ops.dgl_fast.softmax_xent(logits, labels)
    exact_loss, exact_grad, _ = reference.softmax_xent(logits.double(), labels)
    # PyTorch's own same-precision computation of the gradient, as the numerics yardstick.
    x = logits.clone().requires_grad_()
    torch.nn.functional.cross_entropy(x, labels).backward()
    torch_err = (x.grad.double() - exact_grad).abs().max().item()
    ours_err = (grad.double() - exact_grad).abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-6
    torch.testing.assert_close(loss.double(), exact_loss, rtol=1e-5, atol=1e-5)
    assert int(correct) == int((logits.argmax(1) == labels).sum())
    assert grad.dtype == dtype and loss.dtype == torch.float32


def test_float64_loss_dtype(device):
    logits, labels = _inputs((5, 4), torch.float64, device)
    loss, grad, _ = torch.ops.dgl_fast.softmax_xent(logits, labels)
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64


def test_argmax_ties_take_first_index(device):
    logits = torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0], [0.5, 0.5, 0.5]], device=device)
    labels = torch.tensor([2, 0, 0], device=device)
    _, _, correct = torch.ops.dgl_fast.softmax_xent(logits, labels)
    assert int(correct) == int((logits.argmax(1) == labels).sum()) == 2


def test_gradient_through_wrapper(device):
    logits, labels = _inputs((9, 11), torch.float32, device, seed=3)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    loss, _ = ops.softmax_xent(a, labels)
    (2.5 * loss).backward()
    (2.5 * torch.nn.functional.cross_entropy(b, labels)).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_gradcheck_float64_cpu():
    logits, labels = _inputs((6, 5), torch.float64, "cpu", seed=4)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.softmax_xent(t, labels)[0], (logits,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(device, dtype):
    logits, labels = _inputs((7, 13), dtype, device, seed=5)
    torch.library.opcheck(torch.ops.dgl_fast.softmax_xent.default, (logits.requires_grad_(), labels))


def test_labels_out_of_range_cpu():
    logits, labels = _inputs((4, 3), torch.float32, "cpu")
    labels[2] = 3
    with pytest.raises(RuntimeError, match=r"expected labels in \[0, 3\), got 3 at position 2"):
        ops.softmax_xent(logits, labels)


@pytest.mark.cuda
def test_labels_out_of_range_cuda_gives_nan():
    logits, labels = _inputs((4, 3), torch.float32, "cuda")
    labels[1] = -1
    loss, correct = ops.softmax_xent(logits, labels)
    assert torch.isnan(loss).item()


@pytest.mark.parametrize(
    "logits,labels,match",
    [
        (torch.randn(4), torch.zeros(4, dtype=torch.long), r"expected logits of shape \[batch, classes\]"),
        (torch.randn(4, 3), torch.zeros(5, dtype=torch.long), r"expected labels of shape \[4\], got \[5\]"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.int32), "expected int64 labels, got Int"),
        (torch.randint(0, 3, (4, 3)), torch.zeros(4, dtype=torch.long), "expected floating-point logits"),
        (torch.randn(0, 3), torch.zeros(0, dtype=torch.long), "expected at least one sample"),
    ],
)
def test_bad_input(logits, labels, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.dgl_fast.softmax_xent(logits, labels)


@pytest.mark.cuda
def test_cpu_and_cuda_agree():
    logits, labels = _inputs((257, 37), torch.float32, "cpu", seed=7)
    a = torch.ops.dgl_fast.softmax_xent(logits, labels)
    b = torch.ops.dgl_fast.softmax_xent(logits.cuda(), labels.cuda())
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v.cpu(), rtol=1e-5, atol=1e-7)


def test_build_config_reports_kernels():
    cfg = dgl_fast.build_config()
    assert set(cfg) >= {"cuda", "arch_list", "torch", "torch_cuda", "built_with_torch"}
    assert cfg["torch"] == torch.__version__
    assert dgl_fast._native.has_kernel("softmax_xent", "cpu")
    if torch.cuda.is_available():
        assert cfg["cuda"]
