"""Local-learning rules on the harness's CIFAR ResNets: split tables, layers, and each rule trained
by Trainer equal to a plain per-module loop written here from the harness's description
(InfoPro / AugLocal ``LocalResNet.forward``: one ``backward`` per local module, the activations
detached after it, one SGD step over every parameter at the end)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dgl_fast
from dgl_fast import local_nets, models
from dgl_fast.rules.auglocal import pyramid_depths, sampled_layers
from dgl_fast.stage import StageStep

# AugLocal's networks/configs.py, network_config['resnet32']['net_config'] as written there
# ([group, block, layer]); its table for K lists the first K - 1 entries
AUGLOCAL_R32 = [[0, 0, 0], [1, 0, 1], [1, 1, 2], [1, 2, 3], [1, 3, 4], [1, 4, 5], [2, 0, 6], [2, 1, 7], [2, 2, 8],
                [2, 3, 9], [2, 4, 10], [3, 0, 11], [3, 1, 12], [3, 2, 13], [3, 3, 14], [3, 4, 15]]
# ... and its K = 55 table for ResNet-110 (the stem, then blocks (g, 0..17); the last entry [3, 16, 53])
AUGLOCAL_R110_55 = [[0, 0, 0]] + [[g, i, 1 + 18 * (g - 1) + i] for g in (1, 2, 3) for i in range(18)][:53]
# InfoPro's networks/configs.py, InfoPro['resnet32'] and ['resnet110'] (K = 8)
INFOPRO_R32_8 = [[1, 0], [1, 2], [1, 4], [2, 1], [2, 3], [3, 0], [3, 2]]
INFOPRO_R110_8 = [[1, 4], [1, 11], [2, 0], [2, 7], [2, 14], [3, 3], [3, 10]]

TINY = (3, 3, 4, 6)  # tiny widths: the layers are the harness's, the test is fast
# the harness's un-normalisation constants, rounded to float32 as it builds them
MEAN = torch.tensor([v / 255.0 for v in (125.3, 123.0, 113.9)]).view(1, 3, 1, 1)
STD = torch.tensor([v / 255.0 for v in (63.0, 62.1, 66.7)]).view(1, 3, 1, 1)


def _check_modules(model, name, table, n):
    ends = [tuple(e[:2]) for e in table]
    assert model.num_stages == len(ends) + 1
    ids = local_nets.layer_ids(name)
    for j, layers in enumerate(model.module_layers):
        first = (0, 0) if j == 0 else ids[ids.index(ends[j - 1]) + 1]
        last = ends[j] if j < len(ends) else (3, n - 1)
        assert (layers[0], layers[-1]) == (first, last), j
        assert len(model.stages[j]) == len(layers)
        for (g, i), layer in zip(layers, model.stages[j]):  # the stem, or a block of group g
            if g == 0:
                assert isinstance(layer, nn.Sequential) and layer[0].in_channels == 3
            else:
                assert isinstance(layer, local_nets.BasicBlock) and layer.conv1.out_channels == TINY[g]
                assert layer.conv1.stride == ((2, 2) if g > 1 and i == 0 else (1, 1))
                assert (layer.downsample is not None) == (i == 0 and (g > 1 or TINY[g] != TINY[g - 1]))


@pytest.mark.parametrize("K", range(2, 17))
def test_resnet32_split_table_every_K(K):
    model = models.build("resnet32", local_modules=K, rule="dgl", widths=TINY, in_size=8)
    _check_modules(model, "resnet32", AUGLOCAL_R32[:K - 1], 5)


def test_resnet110_K55_and_infopro_tables():
    model = models.build("resnet110", local_modules=55, rule="dgl", widths=TINY, in_size=8)
    _check_modules(model, "resnet110", AUGLOCAL_R110_55, 18)
    assert len(AUGLOCAL_R110_55) == 54 and AUGLOCAL_R110_55[-1] == [3, 16, 53]  # as configs.py writes it
    assert model.module_layers[-1] == [(3, 17)]
    for name, table, n in (("resnet32", INFOPRO_R32_8, 5), ("resnet110", INFOPRO_R110_8, 18)):
        _check_modules(models.build(name, local_modules=8, rule="infopro", split_table="infopro", widths=TINY,
                                    in_size=8), name, table, n)


def test_harness_init_and_auglocal_sampling():
    torch.manual_seed(0)
    model = models.build("resnet32", local_modules=16, rule="auglocal", aux_net_depth=3)
    assert model.num_stages == 13  # the harness subtracts aux_net_depth
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    big = [m for m in convs if m.weight.numel() > 20000]
    for m in big:  # N(0, sqrt(2 / (k k out))) on every conv, the aux networks' included
        want = (2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)) ** 0.5
        assert abs(m.weight.std().item() / want - 1) < 0.05
    assert sampled_layers(0, 16, 3) == [5, 10, 15] and sampled_layers(12, 16, 3) == [13, 14, 15]
    assert sampled_layers(1, 16, 4) == [4, 8, 12, 15]  # round(1 + 14/4 i): 4.5 -> 4, 11.5 -> 12 (half to even)
    blocks = [b for b in model.heads[0].classifier if isinstance(b, local_nets.BasicBlock)]
    assert [(b.conv1.out_channels, b.conv1.stride[0]) for b in blocks] == [(16, 1), (32, 2), (64, 2)]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.heads[0].classifier)  # depth > 1: no BN1d
    assert pyramid_depths(5, 0.5, 6) == [5, 4, 4, 4, 3]  # 5 - i/2: 4.5 -> 4, 3.5 -> 4
    pyr = models.build("resnet32", local_modules=8, rule="auglocal", aux_net_depth=3, pyramid=True, pyramid_coeff=1.0,
                       widths=TINY, in_size=8)
    depths = [sum(isinstance(b, local_nets.BasicBlock) for b in h.classifier) for h in pyr.heads[:-1]]
    assert depths == [3, 2, 2, 1]  # K = 5 after the subtraction: 3 - 2i/3 = 3, 2.33, 1.67, 1


def _weights(j, n_local, a, b):
    r = j / (n_local - 1) if n_local > 1 else 0.0
    return a + (b - a) * r


def _sim(t):
    if t.dim() == 4 and t.shape[1] > 3 and t.shape[2] > 1:
        t = t.flatten(2).std(2)
    t = t.flatten(1)
    t = t - t.mean(1, keepdim=True)
    t = t / (t.norm(dim=1, keepdim=True) + 1e-8)
    return (t @ t.T).clamp(-1, 1)


def _local_loss(rule, head, h, y, img, opts, j, n_local):
    ixx = _weights(j, n_local, opts["ixx_1"], opts["ixx_2"])
    ixy = _weights(j, n_local, opts["ixy_1"], opts["ixy_2"])
    ce = F.cross_entropy(head.classifier(h), y)
    if rule == "infopro":
        up = F.interpolate(h, size=list(img.shape[2:]), mode="bilinear", align_corners=True)
        return ixx * F.binary_cross_entropy(head.decoder(up), img * STD.double() + MEAN.double()) + ixy * ce
    if rule == "predsim":
        onehot = F.one_hot(y, 10).double()
        return ixx * F.mse_loss(_sim(head.decoder(h)), _sim(onehot)) + ixy * ce
    return ixy * ce


def _plain_harness_loop(model, data, rule):
    model = copy.deepcopy(model).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    K = model.num_stages
    for img, y in data:
        opt.zero_grad()
        x = img
        for j, (stage, head) in enumerate(zip(model.stages, model.heads)):
            x = stage(x)
            if j < K - 1:
                _local_loss(rule, head, x, y, img, model.rule_options, j, K - 1).backward()
                x = x.detach()
        F.cross_entropy(model.heads[-1](x), y).backward()
        opt.step()
    return model


RULE_CASES = [("dgl", 5, {}), ("dgl", 3, dict(aux_net_config="mlp", hidden=7)), ("infopro", 5, {}),
              ("infopro", 4, dict(aux_net_config="2c2f", aux_net_config_aux_loss="4c", aux_net_widen=1.5,
                                  split_table="infopro", ixy_1=0.3)),
              ("predsim", 4, dict(hidden_dim=20)), ("auglocal", 6, dict(aux_net_depth=2, pyramid=True))]


@pytest.mark.parametrize("rule,K,kw", RULE_CASES, ids=[f"{r}-{k}-{len(kw)}" for r, k, kw in RULE_CASES])
def test_rule_trainer_equals_plain_harness_loop(rule, K, kw):
    torch.manual_seed(3)
    model = models.build("resnet32", local_modules=K, rule=rule, widths=(4, 4, 8, 16), in_size=9, **kw).double()
    g = torch.Generator().manual_seed(4)
    data = [(((torch.rand(5, 3, 9, 9, generator=g) - MEAN) / STD).double(), torch.randint(0, 10, (5,), generator=g))
            for _ in range(2)]
    ref, init = _plain_harness_loop(model, data, rule), copy.deepcopy(model)
    tr = dgl_fast.Trainer(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True,
                                                                     weight_decay=1e-4), engine="sequential")
    for x, y in data:
        tr.step(x, y)
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=1e-10), k
    for j in range(model.num_stages):  # every module and head trained
        for part in (model.stages[j], model.heads[j]):
            before = dict(init.named_parameters())
            name = "stages" if part is model.stages[j] else "heads"
            assert max((p - before[f"{name}.{j}.{n}"]).abs().max().item() for n, p in part.named_parameters()) > 1e-6


def test_image_rule_step_without_image_refused_and_greedy_gets_it():
    """Every engine carries the image (tests/test_rule_engines.py); a step given none says so."""
    model = models.build("resnet32", local_modules=3, rule="infopro", widths=TINY, in_size=8)
    step = StageStep(0, model.stages[0], model.heads[0], torch.optim.SGD(model.parameters(), lr=0.1),
                     torch.device("cpu"))
    with pytest.raises(ValueError, match="needs the input image for its loss"):  # a step given no image
        step.step(torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,)))
    tr = dgl_fast.Trainer(model, mode="sequential")  # greedy: the active stage gets the image
    x = (torch.rand(4, 3, 8, 8) - MEAN) / STD
    out = tr.step(x, torch.randint(0, 10, (4,)))
    assert torch.isfinite(out.losses[0]) and out.losses[0] > 0
    assert set(model.heads[0].metrics) == {"ce", "aux"}


@pytest.mark.parametrize("rule,kw", [("predsim", dict(hidden_dim=30)), ("infopro", dict(interpolate_mode="nearest"))])
def test_pipeline_equals_sequential(rule, kw):
    """The pipeline engine (in turn) equals the sequential one bitwise; InfoPro's image travels
    with its batch's activations (a wrong batch's image would change every stage's update)."""
    torch.manual_seed(5)
    model = models.build("resnet32", local_modules=5, rule=rule, widths=TINY, in_size=8, **kw)
    data = [((torch.rand(4, 3, 8, 8) - MEAN) / STD, torch.randint(0, 10, (4,))) for _ in range(4)]
    runs = [(copy.deepcopy(model), dict(engine=engine)) for engine in ("sequential", "pipeline")]
    runs.append((copy.deepcopy(model), dict(engine="pipeline", devices=["cpu", "cpu"], placement=[0, 0, 1, 1, 1])))
    for m, kw in runs:
        tr = dgl_fast.Trainer(m, **kw)
        for x, y in data:
            tr.step(x, y)
        tr.flush()
    for m, kw in runs[1:]:
        for (k, p), q in zip(runs[0][0].state_dict().items(), m.state_dict().values()):
            assert torch.equal(p, q), (k, kw)


def test_non_image_rule_async_round_robin_capacity_1_equals_sync():
    torch.manual_seed(6)
    model = models.build("resnet32", local_modules=4, rule="auglocal", aux_net_depth=1, widths=TINY, in_size=8)
    data = [((torch.rand(4, 3, 8, 8) - MEAN) / STD, torch.randint(0, 10, (4,))) for _ in range(3)]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    for m, kw in ((a, dict(engine="sequential")),
                  (b, dict(mode="async", schedule="round_robin", buffer_capacity=1, policy="fifo"))):
        tr = dgl_fast.Trainer(m, **kw)
        for x, y in data:
            tr.step(x, y)
        tr.flush()
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k


@pytest.mark.parametrize("kw,match", [
    (dict(rule="hebbian"), "unknown rule"),
    (dict(rule="dgl", ixx_3=1.0), "takes options"),
    (dict(rule="infopro", local_loss_mode="contrast"), "contrast"),
    (dict(rule="auglocal", local_modules=3, aux_net_depth=2), "leaves 1 modules"),
    (dict(rule="dgl", local_modules=5, split_table="infopro"), "local_modules in"),
    (dict(rule="dgl", local_modules=17), "1..16"),
    (dict(rule="dgl", stages=2), "drop stages"),
    (dict(rule="predsim", hidden_dim=0), "hidden_dim"),
    (dict(rule="infopro", ixx_1=float("nan")), "ixx_1"),
])
def test_bad_rule_options(kw, match):
    with pytest.raises(ValueError, match=match):
        models.build("resnet32", widths=TINY, in_size=8, **kw)
    with pytest.raises(ValueError, match="resnet32, resnet110"):
        models.build("resnet20", rule="dgl")


def test_infopro_defaults_are_run_sh():
    assert [models.build(n, local_modules=2, rule="infopro", widths=TINY, in_size=8).rule_options[k]
            for n in ("resnet32", "resnet110") for k in ("ixx_1", "ixy_1", "ixx_2", "ixy_2")] == \
        [5.0, 0.05, 0.2, 0.5, 5.0, 0.0, 0.5, 1.0]


CLI = ["train", "--model", "resnet32", "--data", "digits", "--epochs", "1", "--batch-size", "256", "--width", "2",
       "--no-progress", "--lr", "0.02"]


def _cli(argv, capsys):
    from dgl_fast import cli  # noqa: PLC0415

    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


def test_cli_trains_a_rule_with_the_harness_option_names(capsys):
    import argparse  # noqa: PLC0415

    from dgl_fast import cli_rules  # noqa: PLC0415

    code, err = _cli(CLI + ["--local_module_num", "4", "--rule", "infopro", "--ixx_1", "2", "--ixy-2", "0.7",
                            "--nesterov", "--cos_lr"], capsys)
    assert code == 0, err
    assert "resnet32 K=4 rule=infopro mode=dgl" in err[0]
    assert any(line.startswith("epoch 1: lr 0.01,") for line in err), err  # the harness's warm start
    p = argparse.ArgumentParser()
    cli_rules.add_arguments(p)
    ns = p.parse_args(["--local_module_num", "16", "--rule", "auglocal", "--aux_net_depth", "3", "--pyramid",
                       "--pyramid-coeff", "0.5", "--aux-net-widen", "1.5", "--ixy_1", "0.25"])
    assert (ns.local_modules, ns.aux_net_depth, ns.pyramid, ns.pyramid_coeff, ns.aux_net_widen, ns.ixy_1) == \
        (16, 3, True, 0.5, 1.5, 0.25)
    assert p.parse_args([]).pyramid is None  # unset: the rule's default applies


def test_cli_restores_the_loader_image_to_unit_range():
    from dgl_fast import data  # noqa: PLC0415
    from dgl_fast.cli_rules import restore_constants  # noqa: PLC0415

    spec = data.load("digits", batch_size=64)
    mean, std = restore_constants(spec.train, 1)
    x, _ = next(iter(spec.train))
    target = x * std[0] + mean[0]
    assert target.min() >= -1e-6 and target.max() <= 1 + 1e-6 and target.max() > 0.9


@pytest.mark.parametrize("extra,expected", [
    (["--rule", "dgl", "--aux_net_depth", "2"], "takes options"),
    (["--rule", "infopro", "--interpolate-mode", "cubic"], "interpolate_mode"),
    (["--rule", "backprop"], "--mode backprop"),
    (["--rule", "dgl", "--stages", "2"], "argument --stages"),
    (["--rule", "predsim", "--ixx_1", "nan"], "ixx_1"),
    (["--rule", "auglocal", "--local-modules", "3", "--aux-net-depth", "2"], "leaves 1 modules"),
    (["--rule", "infopro", "--local-modules", "3", "--engine", "pipeline", "--cuda-graphs"], "cuda_graphs"),
    (["--rule", "dgl", "--nesterov", "--momentum", "0"], "Nesterov"),  # reaches torch's SGD
    (["--rule", "dgl", "--cos_lr", "--lr-step", "3"], "--cos-lr"),
])
def test_cli_refuses_bad_rule_options(extra, expected, capsys):
    code, err = _cli(CLI + extra, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_harness_cosine_schedule():
    import math  # noqa: PLC0415

    from dgl_fast.cli_rules import harness_cosine  # noqa: PLC0415

    f = harness_cosine(0.8, 400)
    lr = [0.8 * f(epoch) for epoch in range(400)]
    assert abs(lr[0] - 0.01) < 1e-15  # e = 1: 0.01 x 10/10
    assert abs(lr[9] - (0.4 * (1 + math.cos(math.pi * 10 / 400)) * 0.9 + 0.001)) < 1e-15
    assert abs(lr[10] - 0.4 * (1 + math.cos(math.pi * 11 / 400))) < 1e-15 and abs(lr[399]) < 1e-15
    assert all(a > b for a, b in zip(lr[10:], lr[11:]))
