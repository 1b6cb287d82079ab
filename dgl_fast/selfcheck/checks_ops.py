"""The environment check and one check per op of dgl_fast.ops against dgl_fast.reference."""

from __future__ import annotations

import copy
import platform

import torch
import torch.nn as nn

from .. import ops, reference
from .common import CheckFailed, close, equal, gen

__all__ = ["environment", "check_env", "check_softmax_xent", "check_aux_pool", "check_linear_bn_relu", "check_bn_update_stats",
           "check_replay_push", "check_replay_sample"]

# --- env ------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    """Build and runtime facts: what the report's header holds."""
    import dgl_fast  # noqa: PLC0415

    __version__, build_config = dgl_fast.__version__, dgl_fast.build_config

    env = {"dgl_fast": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "device": str(device), "build": build_config(),
           "tf32_matmul": False, "tf32_cudnn": False, "cudnn_deterministic": True}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, capability=f"sm_{p.major}{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   sms=p.multi_processor_count, cudnn=torch.backends.cudnn.version())
    else:
        env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


def check_env(device: torch.device) -> tuple[str, dict]:
    env = environment(device)
    cfg = env["build"]
    if device.type == "cuda":
        if not cfg["cuda"]:
            raise CheckFailed("dgl_fast was built without its CUDA kernels (build_config()['cuda'] is False): "
                              "rebuild with nvcc visible (DGL_FAST_CUDA=1)")
        arch = env["capability"][3:]
        archs = (cfg.get("arch_list") or "").replace(";", " ").replace(",", " ").split()
        built = {a.split("+")[0].replace(".", "") for a in archs}
        if built and arch not in built and not any("PTX" in a for a in archs):
            raise CheckFailed(f"kernels compiled for {cfg.get('arch_list')}, the device is {env['capability']}: "
                              "rebuild with TORCH_CUDA_ARCH_LIST naming it")
        where = f"{env['gpu']} ({env['capability']}), CUDA kernels for {cfg.get('arch_list')}"
    else:
        where = f"CPU ({env['cpu']}, {env['threads']} threads), CUDA kernels {'compiled' if cfg['cuda'] else 'not compiled'}"
    built_with = cfg.get("built_with_torch")
    mismatch = f"; built with torch {built_with}" if built_with and built_with != torch.__version__ else ""
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}), {where}{mismatch}", env


# --- ops ------------------------------------------------------------------------------------------


def check_softmax_xent(device: torch.device) -> str:
    g = gen(1)
    for B, C, view in ((7, 13, False), (129, 37, True), (1, 5, False)):
        logits = 3 * torch.randn(C, B, generator=g, dtype=torch.float64).t()
        labels = torch.randint(0, C, (B,), generator=g)
        if view:  # a transposed, non-contiguous view made on the device
            leaf = logits.t().to(device, copy=True).requires_grad_()
            x = leaf.t()
        else:
            leaf = x = logits.to(device, copy=True).contiguous().requires_grad_()
        loss, correct = ops.softmax_xent(x, labels.to(device))
        gout = 1.0 + torch.rand((), generator=g, dtype=torch.float64).item()
        (gout * loss).backward()
        rloss, rgrad, rcorrect = reference.softmax_xent(logits, labels)
        what = f"[{B}, {C}]{' view' if view else ''}"
        if view and x.is_contiguous():
            raise CheckFailed(f"{what}: the test view is contiguous")
        close(f"loss {what}", loss, rloss)
        close(f"gradient {what}", leaf.grad.t() if view else leaf.grad, gout * rgrad)
        if int(correct) != int(rcorrect):
            raise CheckFailed(f"correct count {what}: {int(correct)}, expected {int(rcorrect)}")
    return "loss, gradient, correct count; [7, 13], [129, 37] transposed view, [1, 5]; float64"


def check_aux_pool(device: torch.device) -> str:
    g = gen(2)
    cases = ((5, 7, 9, 11, (3, 2), False), (3, 6, 8, 8, (2, 2), True), (2, 3, 13, 7, (4, 3), False))
    for B, C, H, W, out, cl in cases:
        base = torch.randn(B, C, H + 2, 2 * W, generator=g, dtype=torch.float64)
        leaf, leaf_ref = base.to(device, copy=True).requires_grad_(), base.clone().requires_grad_()
        x, xref = leaf[:, :, 1:-1, ::2], leaf_ref[:, :, 1:-1, ::2]  # strided views, made on the device
        y = ops.aux_pool(x, out, channels_last_out=cl)
        gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
        y.backward(gy.to(device))
        yref = reference.aux_pool(xref, out, cl)
        yref.backward(gy)
        what = f"[{B}, {C}, {H}, {W}] view -> {out}"
        close(f"output {what}", y, yref)
        close(f"input gradient {what}", leaf.grad, leaf_ref.grad)
        if cl and not y.is_contiguous(memory_format=torch.channels_last):
            raise CheckFailed(f"output {what}: channels_last_out=True gave a tensor that is not channels_last")
    # the device's own non-contiguous input (a view made on the device)
    xd = torch.randn(4, 5, 12, 10, generator=g, dtype=torch.float64).to(device)
    v = xd.permute(0, 1, 3, 2)[:, :, 1:, :]
    close("output of a device-side permuted view", ops.aux_pool(v, (3, 3)), reference.aux_pool(v.cpu(), (3, 3)))
    return "forward and input gradient, strided and permuted views, NCHW and channels_last out; float64"


def check_linear_bn_relu(device: torch.device) -> str:
    g = gen(3)
    N, K, M = 37, 19, 23
    for training in (True, False):
        xt = torch.randn(K, N, generator=g, dtype=torch.float64)  # rows x = xt.t(): a non-contiguous view
        w, b = torch.randn(M, K, generator=g, dtype=torch.float64) / K**0.5, torch.randn(M, generator=g, dtype=torch.float64)
        gamma = 0.5 + torch.rand(M, generator=g, dtype=torch.float64)
        beta = torch.randn(M, generator=g, dtype=torch.float64)
        rm, rv = torch.randn(M, generator=g, dtype=torch.float64), 0.5 + torch.rand(M, generator=g, dtype=torch.float64)
        leaves_ref = [t.clone().requires_grad_() for t in (xt, w, b, gamma, beta)]
        leaves = [t.to(device, copy=True).requires_grad_() for t in (xt, w, b, gamma, beta)]
        rm_d, rv_d = rm.to(device), rv.to(device)
        out, mean, var = ops.linear_bn_relu(leaves[0].t(), *leaves[1:], rm_d, rv_d, training, 1e-5)
        rout, rmean, rvar = reference.linear_bn_relu(leaves_ref[0].t(), *leaves_ref[1:], rm, rv, training, 1e-5)
        gout = torch.randn(N, M, generator=g, dtype=torch.float64)
        out.backward(gout.to(device))
        rout.backward(gout)
        mode = "training" if training else "eval"
        close(f"output ({mode})", out, rout)
        close(f"batch mean ({mode})", mean, rmean)
        close(f"batch variance ({mode})", var, rvar)
        for name, a, r in zip(("x", "weight", "bias", "gamma", "beta"), leaves, leaves_ref):
            close(f"gradient of {name} ({mode})", a.grad, r.grad)
        equal(f"running mean untouched ({mode})", rm_d.cpu(), rm)
        equal(f"running variance untouched ({mode})", rv_d.cpu(), rv)
    return f"[{N}, {K}] transposed view x [{M}, {K}], training and eval: output, statistics, 5 gradients; float64"


def check_bn_update_stats(device: torch.device) -> str:
    g = gen(4)
    sizes, counts, moms = (5, 7, 3), (11, 4, 2), (0.1, 0.3, 0.9)
    bns = [nn.BatchNorm1d(m, momentum=mom).double() for m, mom in zip(sizes, moms)]
    for bn in bns:
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g, dtype=torch.float64))
        bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=g, dtype=torch.float64))
    mine = [copy.deepcopy(bn).to(device) for bn in bns]
    xs = [torch.randn(n, m, generator=g, dtype=torch.float64) for n, m in zip(counts, sizes)]
    for bn, x in zip(bns, xs):
        bn.train()(x)  # the reference: nn.BatchNorm1d's own running-statistics update
    means = [x.mean(0).to(device) for x in xs]
    vars_ = [x.var(0, unbiased=False).to(device) for x in xs]
    ops.bn_update_stats([b.running_mean for b in mine], [b.running_var for b in mine],
                        [b.num_batches_tracked for b in mine], means, vars_, list(counts), list(moms))
    for j, (a, r) in enumerate(zip(mine, bns)):
        close(f"layer {j} running mean", a.running_mean, r.running_mean)
        close(f"layer {j} running variance", a.running_var, r.running_var)
        equal(f"layer {j} num_batches_tracked", a.num_batches_tracked.cpu(), r.num_batches_tracked)
    return "3 layers (5, 7, 3 features; batches 11, 4, 2) against nn.BatchNorm1d's update; float64"


def _ring_tensors(M: int, shape: tuple, device, dtype=torch.float64):
    kw = dict(device=device)
    return (torch.empty((M, *shape), dtype=dtype, **kw), torch.empty((M, shape[0]), dtype=torch.long, **kw),
            torch.zeros(4, dtype=torch.long, **kw), torch.zeros(M, dtype=torch.long, **kw),
            torch.zeros(M, dtype=torch.long, **kw))


def _batch(g: torch.Generator, shape: tuple, device, view: bool) -> torch.Tensor:
    if view:  # a non-contiguous view of that shape, made on the device
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=torch.float64).to(device)[..., ::2]
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device)


def check_replay_push(device: torch.device) -> str:
    g = gen(5)
    M, shape = 5, (3, 7, 5)
    storage, labels, state, uses, stamps = _ring_tensors(M, shape, device)
    ring = reference.ReplayRing(M, "fifo")
    for t in range(8):  # wraps around the ring
        x = _batch(g, shape, device, view=t % 2 == 1)
        y = torch.randint(0, 50, (shape[0],), generator=g).to(device)
        ops.replay_push(storage, labels, state, uses, stamps, x, y)
        slot = ring.push(t)
        equal(f"push {t}: stored batch", storage[slot], x.contiguous())
        equal(f"push {t}: stored labels", labels[slot], y)
        want = torch.tensor([ring.head, ring.count, ring.pushes, ring.samples])
        equal(f"push {t}: ring state [head, count, pushes, samples]", state.cpu(), want)
        equal(f"push {t}: stamps", stamps.cpu(), torch.tensor(ring.stamps))
        equal(f"push {t}: uses", uses.cpu(), torch.tensor(ring.uses))
    # float32 batches into float64 storage: converted on the way in
    x32 = torch.randn(shape, generator=g).to(device)
    ops.replay_push(storage, labels, state, uses, stamps, x32, torch.zeros(shape[0], dtype=torch.long, device=device))
    equal("float32 batch stored as float64", storage[ring.push(8)], x32.double())
    return f"{ring.pushes} pushes into a ring of {M} x {list(shape)} (wrap-around, strided views, float32 -> float64)"


def check_replay_sample(device: torch.device) -> str:
    g = gen(6)
    M, shape = 4, (3, 5, 3)
    n = 0
    for policy, max_reuse in (("priority_lifo", None), ("fifo", 2), ("uniform", None)):
        storage, labels, state, uses, stamps = _ring_tensors(M, shape, device)
        ring = reference.ReplayRing(M, policy, max_reuse, seed=7)
        pushed = {}
        out = torch.empty(shape, dtype=torch.float64, device=device)
        out_labels = torch.empty(shape[0], dtype=torch.long, device=device)
        info = torch.empty(2, dtype=torch.long, device=device)
        for t in range(7):
            x = _batch(g, shape, device, view=False)
            y = torch.randint(0, 50, (shape[0],), generator=g).to(device)
            ops.replay_push(storage, labels, state, uses, stamps, x, y)
            pushed[t] = (x, y)
            ring.push(t)
            for k in range(3 if t < 6 else 8):  # the last round exhausts max_reuse
                before = out.clone()
                ops.replay_sample(state, uses, stamps, storage, labels, out, out_labels, info, policy, max_reuse, 7)
                slot = ring.sample()
                n += 1
                what = f"{policy}{f' max_reuse={max_reuse}' if max_reuse else ''}: sample {k} after push {t}"
                got_slot, valid = info.tolist()
                if got_slot != slot or valid != int(slot >= 0):
                    raise CheckFailed(f"{what}: picked slot {got_slot} (valid {valid}), expected {slot}")
                if slot >= 0:
                    x, y = pushed[ring.data[slot]]
                    equal(f"{what}: sampled batch", out, x)
                    equal(f"{what}: sampled labels", out_labels, y)
                else:
                    equal(f"{what}: output left unchanged when nothing is available", out, before)
        equal(f"{policy}: uses", uses.cpu(), torch.tensor(ring.uses))
        equal(f"{policy}: ring state", state.cpu(), torch.tensor([ring.head, ring.count, ring.pushes, ring.samples]))
    return f"{n} samples, priority_lifo / fifo with max_reuse 2 / uniform, slot choices against reference.ReplayRing"
