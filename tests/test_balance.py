"""dgl_fast.balance: the exact contiguous partition (against brute force), and timing real stage
steps without touching the caller's model."""

import copy
import dataclasses
import itertools
import math
import random
import time

import pytest
import torch
import torch.nn as nn

import dgl_fast
from dgl_fast.balancing import Balance, balance, group_times, partition
from helpers import batches, sgd, small_model


def _all_placements(K, parts):
    for cuts in itertools.combinations(range(1, K), parts - 1):
        bounds = (0, *cuts, K)
        yield [g for g, (a, b) in enumerate(zip(bounds, bounds[1:])) for _ in range(b - a)]


def _brute(times, parts):
    """The rule partition() promises: smallest slowest group, then smallest sum of squares, then
    the lexicographically smallest placement (integer times: every sum is exact)."""
    return min(_all_placements(len(times), parts),
               key=lambda p: (max(group_times(times, p)), sum(g * g for g in group_times(times, p)), p))


@pytest.mark.parametrize("K", [1, 2, 3, 5, 8])
def test_partition_equals_brute_force_on_integer_times(K):
    rng = random.Random(K)
    for _ in range(30):
        times = [float(rng.randint(0, 9)) for _ in range(K)]
        for parts in range(1, K + 1):
            assert partition(times, parts) == _brute(times, parts), (times, parts)


@pytest.mark.parametrize("K", [2, 4, 7, 9])
def test_partition_optimal_on_random_float_times(K):
    rng = random.Random(100 + K)
    for _ in range(20):
        times = [rng.uniform(1e-4, 1e-2) for _ in range(K)]
        for parts in range(1, K + 1):
            p = partition(times, parts)
            assert p[0] == 0 and p[-1] == parts - 1 and all(b - a in (0, 1) for a, b in zip(p, p[1:]))
            best = min(max(group_times(times, q)) for q in _all_placements(K, parts))
            assert max(group_times(times, p)) == pytest.approx(best, rel=1e-12)


def test_partition_ties():
    assert partition([1, 1, 1, 1], 2) == [0, 0, 1, 1]
    assert partition([1, 1, 1, 1], 3) == [0, 0, 1, 2]  # earliest groups take the extra stage
    assert partition([1, 1, 1, 1, 1, 1, 1], 3) == [0, 0, 0, 1, 1, 2, 2]
    assert partition([0, 0, 0], 3) == [0, 1, 2]
    assert partition([5, 1, 1, 1, 1, 1], 2) == [0, 1, 1, 1, 1, 1]  # 5 | 5 beats 6 | 4
    assert partition([2, 2, 2, 2, 2], 3) == [0, 0, 1, 1, 2]  # 4 | 4 | 2 and 4 | 2 | 4 tie: the earliest
    assert partition([3, 1, 2, 2], 2) == [0, 0, 1, 1]  # 4 | 4
    assert partition([1, 1, 1, 1, 4], 3) == [0, 0, 1, 1, 2]  # 2 | 2 | 4: the most even of the slowest-4 splits


def test_partition_isolates_a_heavy_stage():
    assert partition([1, 1, 10, 1], 3) == [0, 0, 1, 2]
    assert partition([1, 1, 10, 1], 2) == [0, 0, 1, 1]
    assert partition([10, 1, 1, 1], 2) == [0, 1, 1, 1]


@pytest.mark.parametrize("times,parts,match", [
    ([1, 2], 0, r"parts must be an int from 1 to the number of stages \(2\), got 0"),
    ([1, 2], 3, r"parts must be an int from 1 to the number of stages \(2\), got 3"),
    ([1, 2], 1.0, "parts must be an int"),
    ([1, 2], True, "parts must be an int"),
    ([], 1, "at least one stage time"),
    ([1, math.nan], 1, "finite and >= 0"),
    ([1, -1], 1, "finite and >= 0"),
])
def test_partition_errors(times, parts, match):
    with pytest.raises(ValueError, match=match):
        partition(times, parts)


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_balance_leaves_the_model_alone_and_reports():
    model = small_model(4, seed=1)
    before = _params(model)
    rng = torch.get_rng_state()
    x, y = batches(1, B=16)[0]
    bal = balance(model, (x, y), 2, optimizer=sgd, repeats=3, warmup=1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(torch.get_rng_state(), rng)
    assert isinstance(bal, Balance) and bal.batch_size == 16
    assert bal.placement == partition(bal.stage_times_s, 2)
    assert len(bal.stage_times_s) == 4 and all(t > 0 for t in bal.stage_times_s)
    assert bal.group_times_s == pytest.approx(group_times(bal.stage_times_s, bal.placement))
    assert bal.predicted_throughput == pytest.approx(16 / max(bal.group_times_s))
    # the hand-offs: [B, 4 + 2j, s, s] float32 outputs, s = 9, 5, 5, 3
    assert bal.handoff_bytes == [16 * c * s * s * 4 for c, s in zip((4, 6, 8, 10), (9, 5, 5, 3))]
    assert "placement" in str(bal) and "samples/s" in str(bal)
    with pytest.raises(dataclasses.FrozenInstanceError):
        bal.batch_size = 3


def test_balance_accepts_inputs_alone_and_one_part():
    model = small_model(3)
    x, _ = batches(1)[0]
    bal = balance(model, x, 1, repeats=1, warmup=0)
    assert bal.placement == [0, 0, 0] and len(bal.group_times_s) == 1
    assert balance(model, x, 3, repeats=1).placement == [0, 1, 2]


class _Sleepy(nn.Module):
    """The same stage after a sleep of ``seconds`` in its forward (a floor the OS guarantees)."""

    def __init__(self, inner, seconds):
        super().__init__()
        self.inner, self.seconds = inner, seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.inner(x)


def test_balance_logic_with_a_fake_clock():
    """The measured times are what the clock says each stage step took: with a fake clock that
    each stage's forward advances by a known cost, balance reports exactly those costs, the
    exact partition of them, its group sums and the throughput they predict (no real timing)."""
    model = small_model(5, seed=2, size=11)
    costs = [0.003, 0.0011, 0.047, 0.002, 0.0093]  # seconds, odd and uneven
    now = [100.0]
    for j, stage in enumerate(model.stages):
        stage.register_forward_pre_hook(lambda m, args, j=j: now.__setitem__(0, now[0] + costs[j]))
    x, y = batches(1, B=7, size=11)[0]
    bal = balance(model, (x, y), 3, optimizer=sgd, repeats=3, warmup=1, clock=lambda: now[0])
    assert bal.stage_times_s == pytest.approx(costs, abs=1e-12)
    assert bal.placement == partition(costs, 3)
    assert bal.placement.count(bal.placement[2]) == 1  # the heavy stage alone in its group
    assert bal.group_times_s == pytest.approx(group_times(costs, bal.placement), abs=1e-12)
    assert bal.predicted_throughput == pytest.approx(7 / max(bal.group_times_s))
    with pytest.raises(TypeError, match="clock must be a callable"):
        balance(model, (x, y), 2, clock=3.0)


def test_balance_times_stage_steps_with_the_real_clock():
    """The one test of real timing, by a floor no machine noise can break: a stage that sleeps
    0.05 s in its forward is measured at 0.05 s or more by the default clock (``time.sleep`` never
    returns early; the median of timed passes that each slept), in seconds (a loose ceiling
    catches ms or ns). No ratio between stages is asserted: on a shared 2-core machine a 1 ms stage
    was once measured at 159 ms, slower than a hundredfold heavier one."""
    model = small_model(4, seed=2, size=16)
    model.stages[2] = _Sleepy(model.stages[2], 0.05)
    x, y = batches(1, B=32, size=16)[0]
    bal = balance(model, (x, y), 3, optimizer=sgd, repeats=3, warmup=1)
    assert bal.stage_times_s[2] >= 0.05, str(bal)
    assert all(0 < t < 600 for t in bal.stage_times_s), str(bal)


def test_balance_errors():
    model = small_model(3)
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match=r"parts must be an int from 1 to the number of stages \(3\), got 4"):
        balance(model, (x, y), 4)
    with pytest.raises(ValueError, match=r"parts must be an int .* got 0"):
        balance(model, (x, y), 0)
    with pytest.raises(ValueError, match=r"does not match the model's input_shape: expected \[B, 3, 9, 9\]"):
        balance(model, (x[:, :, :8], y), 2)
    with pytest.raises(ValueError, match="at least 2 samples"):
        balance(model, (x[:1], y[:1]), 2)
    with pytest.raises(ValueError, match=r"expected labels of shape \[6\]"):
        balance(model, (x, y[:3]), 2)
    with pytest.raises(TypeError, match="sample_batch must be a tensor x or a pair"):
        balance(model, [x.numpy(), y], 2)
    with pytest.raises(TypeError, match="expects a dgl_fast.DecoupledModel"):
        balance(nn.Linear(2, 2), (x, y), 1)
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        balance(model, (x, y), 1, repeats=0)


def test_module_is_exported():
    # dgl_fast.balance is the function (as the README documents it), dgl_fast.balancing its module
    assert dgl_fast.balance is balance and callable(dgl_fast.balance)
    assert dgl_fast.balancing.balance is balance and dgl_fast.balancing.partition is partition
    assert copy.copy(dgl_fast.balancing.__all__) == ["Balance", "balance", "partition", "group_times"]


def test_balance_called_as_the_readme_documents_it():
    net, (x, y) = small_model(3, seed=5, size=9), batches(1, B=6)[0]
    bal = dgl_fast.balance(net, (x, y), 2)
    assert len(bal.placement) == 3 and sorted(set(bal.placement)) == [0, 1]


def test_balance_refuses_numpy_and_meta_batches_by_name():
    net, (x, y) = small_model(2, seed=5, size=9), batches(1, B=6)[0]
    with pytest.raises(TypeError, match=r"pair \(x, y\) of torch tensors, got \(ndarray, ndarray\).*torch.from_numpy"):
        balance(net, (x.numpy(), y.numpy()), 1)
    with pytest.raises(ValueError, match="x is a meta tensor"):
        balance(net, (x.to("meta"), y), 1)
    with pytest.raises(ValueError, match="the model's 'stages.0.0.weight' is a meta tensor"):  # timed nonsense before
        balance(small_model(2, seed=5, size=9).to("meta"), (x, y), 1)
