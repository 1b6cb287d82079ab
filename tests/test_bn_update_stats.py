"""bn_update_stats against nn.BatchNorm's own running-statistics update."""

import copy

import torch

from dgl_fast import ops


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
