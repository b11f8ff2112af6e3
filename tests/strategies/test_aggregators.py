"""Aggregators and pre-aggregators: one conformance suite over every aggregator config in
conf/strategy/aggregator (docs/design.md, "Tests"), then known answers on small hand-computed
matrices for each rule."""

from __future__ import annotations

import io
import math

import pytest
import torch

from fedsim.errors import ConfigError
from fedsim.simulation import make
from strategies.aggregators import (
    NNA,
    CenteredClipping,
    GeometricMedian,
    Krum,
    Meamed,
    Median,
    MultiKrum,
    TrimmedMean,
    pairwise_sq_distances,
)
from strategies.client import LocalSGD
from strategies.fedavg import FedAvg
from strategies.preaggregators import ARC, NNM, Bucketing, Clipping, build_chain
from tests.conftest import CONF, compose, run_facts

AGGREGATORS = sorted(p.stem for p in (CONF / "strategy" / "aggregator").glob("*.yaml"))
PRE = ["nnm", "bucketing", "clipping", "arc"]
N, D, F = 11, 7, 2

# Rules that equal the plain mean when f = 0 (with centered clipping's default radius 100).
MEAN_AT_F0 = {"mean", "trimmed_mean", "multi_krum", "meamed", "nna", "centered_clipping"}


def rule(name: str, f: int = F):
    return make(compose(f"strategy/aggregator={name}", f"byzantine.num={f}").strategy.aggregator)


def run(agg, U, state=None):
    w = torch.ones(U.shape[0], dtype=torch.float64)
    if state is not None:
        return agg.aggregate(U, w, state)
    return agg(U, w)


def honest(n=N, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + 3.0


def test_every_aggregator_config_is_covered():
    assert {
        "mean",
        "median",
        "trimmed_mean",
        "krum",
        "multi_krum",
        "geometric_median",
        "centered_clipping",
        "meamed",
        "nna",
    } <= set(AGGREGATORS)


@pytest.mark.parametrize("name", AGGREGATORS)
class TestConformance:
    def test_shape_and_no_mutation(self, name):
        U = honest()
        before = U.clone()
        out = run(rule(name), U)
        assert out.shape == (D,) and out.dtype == U.dtype
        assert torch.equal(U, before)

    def test_permutation_invariance(self, name):
        U = honest()
        agg = rule(name)
        # NNA is defined around row 0 (a node's own vector), so row 0 stays in place.
        perm = torch.cat(
            [torch.zeros(1, dtype=torch.long), 1 + torch.randperm(N - 1, generator=torch.Generator().manual_seed(3))]
        )
        if name != "nna":
            perm = torch.randperm(N, generator=torch.Generator().manual_seed(3))
        assert torch.allclose(run(agg, U), run(agg, U[perm]), atol=1e-5)

    def test_identical_rows_give_that_row(self, name):
        row = torch.linspace(-1.0, 2.0, D)
        out = run(rule(name), row.repeat(N, 1))
        assert torch.allclose(out, row, atol=1e-6)

    def test_f0_is_near_the_mean(self, name):
        U = honest()
        out = run(rule(name, f=0), U)
        mean = U.mean(dim=0)
        if name in MEAN_AT_F0:
            assert torch.allclose(out, mean, atol=1e-5)
        else:  # median, Krum, geometric median: inside the honest cloud, closer than its farthest row
            radius = torch.linalg.vector_norm(U - mean, dim=1).max()
            assert torch.linalg.vector_norm(out - mean) < radius

    @pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
    def test_finite_under_non_finite_rows_within_declared_f(self, name, bad):
        if name == "mean":
            pytest.skip("the mean tolerates no Byzantine row (declared f = 0)")
        U = honest()
        U[3] = bad
        U[N - 1, 2] = bad  # a row with a single bad coordinate
        out = run(rule(name), U)
        assert torch.isfinite(out).all()
        # and it stays near the honest rows
        good = torch.cat([U[:3], U[4 : N - 1]])
        assert (
            torch.linalg.vector_norm(out - good.mean(dim=0))
            < 2 * torch.linalg.vector_norm(good - good.mean(dim=0), dim=1).max()
        )

    @pytest.mark.parametrize("pre", PRE)
    def test_chain_with_preaggregator(self, name, pre):
        if name == "mean" and pre not in ("clipping",):
            pytest.skip("the mean tolerates no Byzantine row")
        strat = FedAvg(client=LocalSGD(), aggregator=rule(name), preaggregators=[pre], f=F, weighted=False)
        U = honest()
        U[5] = float("inf")
        before = U.clone()
        out, _ = strat.aggregate(
            U,
            torch.ones(N, dtype=torch.float64),
            strat.init(U[0], run_facts(N))["aggregator"],
            torch.Generator().manual_seed(0),
        )
        assert out.shape == (D,) and torch.isfinite(out).all()
        assert torch.equal(U.isinf(), before.isinf()) and torch.equal(U[~U.isinf()], before[~before.isinf()])

    def test_state_round_trips_through_torch_save(self, name):
        agg = rule(name)
        state = agg.init()
        out1, state = agg.aggregate(honest(seed=1), torch.ones(N, dtype=torch.float64), state)
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        loaded = torch.load(buf)
        a, _ = agg.aggregate(honest(seed=2), torch.ones(N, dtype=torch.float64), state)
        b, _ = agg.aggregate(honest(seed=2), torch.ones(N, dtype=torch.float64), loaded)
        assert torch.equal(a, b)


def col(*values):
    """A one-column (n, 1) matrix."""
    return torch.tensor(values, dtype=torch.float32)[:, None]


ONES4 = torch.ones(4, dtype=torch.float64)


def test_median_known_answers_and_even_n_convention():
    assert Median()(col(1, 5, 3), ONES4[:3]).item() == 3.0
    # even n: the average of the two middle values (numpy), not torch.median's lower one (2)
    assert Median()(col(1, 2, 10, 20), ONES4).item() == 6.0
    assert torch.median(col(1, 2, 10, 20)).item() == 2.0


def test_trimmed_mean_known_answer():
    U = torch.tensor([[1.0, -5.0], [2.0, 0.0], [3.0, 1.0], [100.0, 2.0]])
    assert torch.equal(TrimmedMean(f=1)(U, ONES4), torch.tensor([2.5, 0.5]))
    with pytest.raises(ConfigError, match="2f < n"):
        TrimmedMean(f=2)(U, ONES4)


def test_krum_and_multi_krum_known_answers():
    U = col(0, 1, 2, 10)
    # scores with f = 1 (mean of the 2 smallest squared distances): 2.5, 1, 2.5, 72.5
    assert Krum(f=1)(U, ONES4).item() == 1.0
    assert MultiKrum(f=1)(U, ONES4).item() == 1.0  # mean of rows 1, 0, 2 (m = n - f = 3)
    assert MultiKrum(f=1, m=1)(U, ONES4).item() == 1.0
    assert MultiKrum(f=1, m=4)(U, ONES4).item() == pytest.approx(13 / 4)


def test_geometric_median_known_answers():
    U = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    # one Weiszfeld step from z0 = 0: beta = (1/2)/[5, max(0.1, 0)] -> z = 0.2 [3, 4] / 10.2
    one = GeometricMedian(iters=1)(U, ONES4[:2])
    assert torch.allclose(one, torch.tensor([3.0, 4.0]) * 0.2 / 10.2)
    # 1-D points 0, 1, 10: the geometric median is the median, a fixed point from the median start
    gm = GeometricMedian(iters=5, start="median")(col(0, 1, 10), ONES4[:3])
    assert gm.item() == pytest.approx(1.0, abs=1e-6)
    # many iterations from zero converge to the same point
    assert GeometricMedian(iters=200, nu=1e-6)(col(0, 1, 10), ONES4[:3]).item() == pytest.approx(1.0, abs=1e-3)


def test_centered_clipping_known_answer_and_explicit_state():
    U = torch.tensor([[3.0, 4.0], [0.0, 0.5]])
    cc = CenteredClipping(tau=1.0)
    out, state = cc.aggregate(U, ONES4[:2], cc.init())
    assert torch.allclose(out, torch.tensor([0.3, 0.65]))
    assert torch.equal(state["center"], out)
    # second call starts from the previous output
    out2, _ = cc.aggregate(U, ONES4[:2], state)
    d0, d1 = U[0] - out, U[1] - out
    expect = out + (d0 * min(1.0, 1.0 / float(d0.norm())) + d1 * min(1.0, 1.0 / float(d1.norm()))) / 2
    assert torch.allclose(out2, expect)


def test_meamed_known_answer():
    # median 2.5; the 3 values closest: 2, 3, 1 -> 2
    assert Meamed(f=1)(col(1, 2, 3, 100), ONES4).item() == 2.0


def test_nna_known_answer_and_ties():
    # the 3 vectors closest to row 0 (value 0): 0, 1, -2
    assert NNA(f=1)(col(0, 1, 5, -2), ONES4).item() == pytest.approx(-1 / 3)
    assert NNA(f=1).around(col(0, 1, 5, -2), 2).item() == pytest.approx(2.0)  # 5, 1, 0


def test_nnm_known_answer():
    out, w = NNM(f=1)(col(0, 1, 2, 10), ONES4)
    assert torch.allclose(out[:, 0], torch.tensor([1.0, 1.0, 1.0, 13 / 3]))
    assert torch.equal(w, ONES4)


def test_bucketing_averages_a_seeded_partition():
    U = torch.arange(10, dtype=torch.float32)[:, None]
    out, w = Bucketing(s=3)(U, torch.ones(10, dtype=torch.float64), rng=torch.Generator().manual_seed(0))
    assert out.shape == (4, 1) and w.shape == (4,)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    expect = torch.stack([U[perm[i : i + 3]].mean(0) for i in range(0, 10, 3)])
    assert torch.allclose(out, expect)
    again, _ = Bucketing(s=3)(U, torch.ones(10, dtype=torch.float64), rng=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_clipping_and_arc_known_answers():
    U = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out, _ = Clipping(c=1.0)(U, ONES4[:2])
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))
    # ARC, f = 1, n = 4: k = floor(2 * 1/4 * 3) = 1 row clipped to the 3rd smallest norm (3)
    V = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 10.0]])
    arc, _ = ARC(f=1)(V, ONES4)
    assert torch.allclose(arc, torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 3.0]]))
    assert torch.equal(ARC(f=0)(V, ONES4)[0], V)


def test_pairwise_distances_match_direct_computation_and_handle_inf():
    U = honest(n=6, d=50)
    D = pairwise_sq_distances(U)
    direct = ((U[:, None, :].double() - U[None, :, :].double()) ** 2).sum(-1)
    assert torch.allclose(D, direct, rtol=1e-5, atol=1e-4)
    U[2, 0] = float("inf")
    D = pairwise_sq_distances(U)
    assert math.isinf(D[2, 0]) and math.isinf(D[0, 2]) and D[2, 2] == 0 and math.isfinite(D[0, 1])


def test_chain_building_from_yaml_forms():
    chain = build_chain(
        ["nnm", {"name": "clipping", "c": 5.0}, {"_target_": "strategies.preaggregators.ARC", "f": 1}], f=2
    )
    assert [type(p).__name__ for p in chain] == ["NNM", "Clipping", "ARC"]
    assert chain[0].f == 2 and chain[1].c == 5.0 and chain[2].f == 1
    with pytest.raises(ConfigError, match="unknown pre-aggregator"):
        build_chain(["nmm"], f=1)
    with pytest.raises(ConfigError, match="bad options"):
        build_chain([{"name": "clipping", "radius": 1}], f=1)


def test_strategy_check_reports_too_many_declared_faults():
    strat = FedAvg(client=LocalSGD(), aggregator=TrimmedMean(f=3), preaggregators=["bucketing"], f=3)
    with pytest.raises(ConfigError, match="trimmed_mean needs 2f < n"):
        strat.check(10)  # bucketing of 10 rows by 2 leaves 5 rows
    FedAvg(client=LocalSGD(), aggregator=TrimmedMean(f=3)).check(10)


def test_self_centred_clipping_centres_on_row_zero():
    U = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.5]])
    scc = CenteredClipping(tau=1.0, iters=1, center="own")
    out, state = scc.aggregate(U, torch.ones(3, dtype=torch.float64), {})
    # from row 0 = 0: clipped deltas (0, 0), (0.6, 0.8), (0, 0.5), averaged over the 3 rows
    assert torch.allclose(out, torch.tensor([0.2, 1.3 / 3])) and state == {}
