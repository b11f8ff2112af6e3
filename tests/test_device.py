"""Device-following (fedsim/devices.py): server-side and node-side code makes its tensors on the
device of its inputs, and its random draws on the CPU streams, so that it runs on a GPU as on
the CPU.

Two kinds of test, over every aggregator, pre-aggregator, update attack (through the injection
of its rows), compressor with every feedback rule (through `fedsim.uplink.Uplink`, node and server
side), strategy server step (conf/strategy, a new YAML is covered at once) and the strategies'
own client code:

- on the CPU, each scenario runs twice: as it is, then under ``torch.device("meta")``, which puts
  every tensor made without an explicit device on the meta device. A tensor made that way either
  meets the CPU inputs (an error), or ends in the output (not on the CPU), or silently changes
  it (some mixed ops compute garbage): each fails the comparison with the plain run;
- ``device`` in cpu, cuda (``-m gpu``; skipped without a CUDA device): the same scenario with its
  inputs on that device leaves its outputs there, equal to the CPU's to float tolerance.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedsim.contract import Strategy, UpdateAttack, message_layout
from fedsim.faults.byzantine import Byzantine, inject
from fedsim.params import FlatModel
from fedsim.seeding import np_rng, torch_rng
from fedsim.simulation import make, make_attack
from fedsim.types import ClientContext, Layout, NodeData, RoundInfo, UpdateBatch, Vector
from fedsim.uplink import Uplink
from strategies import label_shift as ls
from strategies.aggregators import NNA, Median, TrimmedMean
from strategies.client import LocalSGD
from strategies.fedavg import FedAvg
from strategies.feddyn import FedDynClient
from strategies.fednova import FedNovaClient
from strategies.fedprox import FedProxClient
from strategies.floral import FloralSGD
from strategies.monna import MoNNA
from strategies.preaggregators import PRE_AGGREGATORS, build_chain
from strategies.scaffold import Scaffold, ScaffoldClient
from strategies.vrls import VRLSClient
from tests.conftest import CONF, compose, run_facts

NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]),
]
N, D, F = 11, 24, 2
"""Rows, columns and the declared f of the server-side scenarios."""
CPU = torch.device("cpu")


def stems(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@cache
def cfg(*overrides: str):
    return compose(*overrides)


def ids(case: tuple[str, tuple[str, ...]]) -> str:
    name, extra = case

    def short(option: str) -> str:
        key, _, value = option.partition("=")
        return f"{key.replace('/', '.').split('.')[-1]}={value}"

    return name + (f"[{','.join(short(o) for o in extra)}]" if extra else "")


# -- comparing two runs --------------------------------------------------------------------------


def walk(a: Any, b: Any, leaf: Callable[[Any, Any, str], None], path: str = "output") -> None:
    """Call ``leaf`` on every pair of corresponding tensors, arrays and numbers of two results."""
    if isinstance(a, (torch.Tensor, np.ndarray, float, int, str, type(None))):
        leaf(a, b, path)
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), (
            f"{path}: keys {sorted(map(str, b))} != {sorted(map(str, a))}"
        )
        for k in a:
            if isinstance(k, str) and k.endswith("time_s"):
                continue  # a wall-clock timing (e.g. inversion/time_s): never the same twice
            walk(a[k], b[k], leaf, f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            walk(x, y, leaf, f"{path}[{i}]")
    elif dataclasses.is_dataclass(a) and not isinstance(a, type):
        assert type(a) is type(b), path
        for f in dataclasses.fields(a):
            walk(getattr(a, f.name), getattr(b, f.name), leaf, f"{path}.{f.name}")
    else:
        assert a == b, f"{path}: {b!r} != {a!r}"


def _same(a: Any, b: Any, path: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: {type(b).__name__}, not a tensor"
        assert b.device == a.device, f"{path} is on {b.device}, not {a.device}: made without following its inputs"
        assert (b.dtype, b.shape) == (a.dtype, a.shape), f"{path}: {b.dtype} {tuple(b.shape)}"
        assert bool(((a == b) | (a.isnan() & b.isnan())).all()), f"{path} differs"
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), f"{path} differs"
    elif isinstance(a, float):
        assert isinstance(b, float) and (a == b or (math.isnan(a) and math.isnan(b))), f"{path}: {b} != {a}"
    else:
        assert a == b, f"{path}: {b!r} != {a!r}"


def unchanged_in_meta(scenario: Callable[[], Any]) -> None:
    """``scenario()`` on the CPU, then again with the default device set to meta: equal results,
    all on the CPU, or the scenario makes a tensor without following its inputs."""
    plain = scenario()
    with torch.device("meta"):
        try:
            meta = scenario()
        except Exception as exc:  # noqa: BLE001 - any failure here is the finding
            raise AssertionError(
                f"the scenario fails when tensors made without a device land on meta: {type(exc).__name__}: {exc}"
            ) from exc
    walk(plain, meta, _same)


def magnitude(result: Any) -> float:
    """The largest finite magnitude of the floating-point values in ``result`` (at least 1)."""
    largest = [1.0]

    def leaf(a: Any, _: Any, path: str) -> None:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            finite = a[torch.isfinite(a)]
            largest.append(float(finite.abs().max()) if finite.numel() else 0.0)
        elif isinstance(a, np.ndarray) and a.dtype.kind in "fc":
            largest.append(float(np.abs(a[np.isfinite(a)]).max(initial=0.0)))
        elif isinstance(a, float) and math.isfinite(a):
            largest.append(abs(a))

    walk(result, result, leaf)
    return max(largest)


def close_on(device: str, scale: float, *, cpu_ok: tuple[str, ...] = ()) -> Callable[[Any, Any, str], None]:
    """A leaf check: the tensor is on ``device`` (those whose path contains one of ``cpu_ok`` may
    stay on the CPU) and equals the CPU's to float tolerance: rtol 1e-5 and atol 1e-6 times
    ``scale``, the largest magnitude of the scenario's results (a difference of large values,
    such as an error-feedback residual p - C(p), carries their rounding error, not its own)."""
    kind = torch.device(device).type
    atol = 1e-6 * scale

    def leaf(ref: Any, out: Any, path: str) -> None:
        if isinstance(ref, torch.Tensor):
            assert isinstance(out, torch.Tensor), f"{path}: {type(out).__name__}, not a tensor"
            where = CPU.type if any(k in path for k in cpu_ok) else kind
            assert out.device.type == where, f"{path} is on {out.device}, not {where}"
            out = out.cpu()
            if ref.is_floating_point():
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=atol, equal_nan=True, msg=lambda m: f"{path}: {m}")
            else:
                assert torch.equal(out, ref), f"{path} differs"
        elif isinstance(ref, np.ndarray) and ref.dtype.kind in "fc":
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=atol, equal_nan=True, err_msg=path)
        elif isinstance(ref, float):
            assert isinstance(out, float), path
            assert (math.isnan(ref) and math.isnan(out)) or math.isclose(out, ref, rel_tol=1e-5, abs_tol=atol), (
                f"{path}: {out} != {ref}"
            )
        else:
            _same(ref, out, path)

    return leaf


def on_device(scenario: Callable[[str], Any], device: str, *, cpu_ok: tuple[str, ...] = ()) -> None:
    """``scenario(device)`` leaves its outputs on ``device``, equal to ``scenario("cpu")``; each
    of a scenario's results (the entries of the list it returns) has its own scale."""
    reference, result = scenario("cpu"), scenario(device)
    if not isinstance(reference, list):
        reference, result = [reference], [result]
    assert isinstance(result, list) and len(result) == len(reference)
    for i, (ref, out) in enumerate(zip(reference, result)):
        walk(ref, out, close_on(device, magnitude(ref), cpu_ok=cpu_ok), f"output[{i}]")


def matrix(seed: int, n: int = N, d: int = D, *, bad: bool = False) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    U = torch.randn(n, d, generator=g, device="cpu") * 2.0 + 1.0
    if bad:  # a row of +inf, a row with one NaN
        U[3] = float("inf")
        U[n - 1, 2] = float("nan")
    return U


WEIGHTS = torch.arange(1, N + 1, dtype=torch.float64, device="cpu")


def test_the_meta_check_catches_a_tensor_made_without_a_device():
    """The harness itself: a rule that adds a device-less zero vector fails it (on the CPU the
    rule is correct), and the same rule written with ``new_zeros`` passes."""
    U = matrix(0)

    def careless(X: torch.Tensor) -> torch.Tensor:
        return X.mean(0) + torch.zeros(X.shape[1])

    def careful(X: torch.Tensor) -> torch.Tensor:
        return X.mean(0) + X.new_zeros(X.shape[1])

    with pytest.raises(AssertionError, match="meta"):
        unchanged_in_meta(lambda: careless(U))
    unchanged_in_meta(lambda: careful(U))


# -- aggregators and pre-aggregators -------------------------------------------------------------

AGGREGATORS = [(name, ()) for name in stems("strategy/aggregator")] + [
    ("geometric_median", ("strategy.aggregator.start=median", "strategy.aggregator.iters=4")),
    ("geometric_median", ("strategy.aggregator.start=mean",)),
    ("centered_clipping", ("strategy.aggregator.iters=3", "strategy.aggregator.tau=0.5")),
    ("centered_clipping", ("strategy.aggregator.center=own", "strategy.aggregator.tau=0.5")),
    ("multi_krum", ("strategy.aggregator.m=3",)),
]


def aggregator(name: str, extra: tuple[str, ...]) -> Any:
    return make(cfg(f"strategy/aggregator={name}", f"byzantine.num={F}", *extra).strategy.aggregator)


def aggregator_scenario(rule: Any, U: torch.Tensor) -> Callable[[str], Any]:
    def run(device: str) -> Any:
        X, w = U.to(device), WEIGHTS.to(device)
        first, state = rule.aggregate(X, w, rule.init())
        second, state = rule.aggregate(X * 0.5 + 1.0, w, state)  # from the state of the first call
        return first, second, state

    return run


@pytest.mark.parametrize("bad", [False, True], ids=["finite", "non_finite"])
@pytest.mark.parametrize("case", AGGREGATORS, ids=ids)
def test_aggregators_make_no_tensor_off_their_inputs_device(case, bad):
    run = aggregator_scenario(aggregator(*case), matrix(0, bad=bad))
    unchanged_in_meta(lambda: run("cpu"))


@pytest.mark.parametrize("case", AGGREGATORS, ids=ids)
@pytest.mark.parametrize("device", DEVICES)
def test_aggregators_run_on_their_inputs_device(device, case):
    for bad in (False, True):
        on_device(aggregator_scenario(aggregator(*case), matrix(0, bad=bad)), device)


PRE = sorted(PRE_AGGREGATORS)


def preaggregator_scenario(name: str, U: torch.Tensor) -> Callable[[str], Any]:
    (pre,) = build_chain([name], f=F)

    def run(device: str) -> Any:
        return pre(U.to(device), WEIGHTS.to(device), rng=torch_rng(3, "preagg", 1))

    return run


@pytest.mark.parametrize("bad", [False, True], ids=["finite", "non_finite"])
@pytest.mark.parametrize("name", PRE)
def test_preaggregators_make_no_tensor_off_their_inputs_device(name, bad):
    run = preaggregator_scenario(name, matrix(1, bad=bad))
    unchanged_in_meta(lambda: run("cpu"))


@pytest.mark.parametrize("name", PRE)
@pytest.mark.parametrize("device", DEVICES)
def test_preaggregators_run_on_their_inputs_device(device, name):
    for bad in (False, True):
        on_device(preaggregator_scenario(name, matrix(1, bad=bad)), device)


# -- update attacks, through the injection of their rows ------------------------------------------

ATTACKS = [(name, ()) for name in stems("attack") if name != "none"] + [
    ("mimic", ("attack.heuristic=true", "attack.warmup=2")),
    ("optimal_alie", ("attack.search=monna", "attack.objective=all_honest")),
]
HONEST = 9
BYZANTINE_IDS = [HONEST, HONEST + 1]
SIZES = np.arange(5, 5 + HONEST + 2)
TWO = Layout((Vector("update"), Vector("steps", size=1, compress=False)), D)


def batch_on(device: str, messages: torch.Tensor, *, layout: Layout | None = None, version: int = 0) -> UpdateBatch:
    """A batch of ``messages`` from nodes 0..k-1, as the server holds it: every column on
    ``device`` but the per-node metrics (only logged, on the CPU)."""
    k = messages.shape[0]
    return UpdateBatch(
        node_ids=torch.arange(k, device=device),
        messages=messages.to(device),
        num_examples=torch.as_tensor(SIZES[:k], dtype=torch.int64, device=device),
        base_version=torch.full((k,), version, dtype=torch.int64, device=device),
        bytes_up=torch.full((k,), 4 * messages.shape[1], dtype=torch.int64, device=device),
        metrics={"train/loss": torch.linspace(0.5, 1.5, k, dtype=torch.float64, device="cpu")},
        layout=layout,
    )


def update_attack(name: str, extra: tuple[str, ...]) -> UpdateAttack | None:
    if "budget" in cfg(f"attack={name}").attack:  # a line search: a few evaluations are enough here
        extra = (*extra, "attack.budget=6")
    attack = make_attack(cfg(f"attack={name}", *extra).attack)
    return attack if isinstance(attack, UpdateAttack) else None


def attack_scenario(attack: UpdateAttack, peer: bool) -> Callable[[str], Any]:
    """Three steps of one-vector rows, two of two-vector rows; the line-searched attacks search
    against a server's rule (bucketing, then the trimmed mean) or MoNNA's per-node NNA."""
    if peer:
        strategy: Strategy = MoNNA(client=LocalSGD(), aggregator=NNA(f=F), f=F)
        attack.adopt(MoNNA.attack_defaults) if hasattr(attack, "adopt") else None
    else:
        strategy = FedAvg(client=LocalSGD(), aggregator=TrimmedMean(f=F), preaggregators=["bucketing"], f=F)
    byzantine = Byzantine(frozenset(BYZANTINE_IDS), F, attack)
    one = [matrix(10 + r, HONEST) for r in range(3)]
    two = [matrix(20 + r, HONEST, D + 1).abs() for r in range(2)]

    def run(device: str) -> Any:
        out, state = [], {}
        for rounds, layout in ((one, None), (two, TWO)):
            state = {}
            for r, honest in enumerate(rounds):
                info = RoundInfo(r, r, 5, HONEST + 2, tuple(range(HONEST + 2)), F)
                defence = strategy.defence({"aggregator": {}}, info) if attack.needs_defence else None
                injected = inject(
                    batch_on(device, honest, layout=layout, version=r),
                    BYZANTINE_IDS,
                    byzantine=byzantine,
                    info=info,
                    state=state,
                    defence=defence,
                    sizes=SIZES,
                )
                state = injected.attack_state
                out.append(injected)
        return out

    return run


@pytest.mark.parametrize("peer", [False, True], ids=["server_rule", "peer_rule"])
@pytest.mark.parametrize("case", ATTACKS, ids=ids)
def test_attacks_make_no_tensor_off_the_honest_rows_device(case, peer):
    attack = update_attack(*case)
    if attack is None:
        pytest.skip("a data attack: it poisons labels inside the nodes")
    if peer and not attack.needs_defence:
        pytest.skip("it does not search against a defence")
    run = attack_scenario(attack, peer)
    unchanged_in_meta(lambda: run("cpu"))


@pytest.mark.parametrize("case", ATTACKS, ids=ids)
@pytest.mark.parametrize("device", DEVICES)
def test_attacks_run_on_the_honest_rows_device(device, case):
    attack = update_attack(*case)
    if attack is None:
        pytest.skip("a data attack: it poisons labels inside the nodes")
    on_device(attack_scenario(attack, False), device, cpu_ok=(".metrics",))


# -- compressors and feedback rules, through the uplink -------------------------------------------

COMPRESSORS = [(name, ()) for name in stems("compressor")] + [
    (name, ("compressor.layerwise=true",))
    for name in stems("compressor")
    if "layerwise" in cfg(f"compressor={name}").compressor
]
FEEDBACK = stems("feedback")
LAYER_SIZES = [10, 0, 9, 5]


def uplink_of(compressor: str, extra: tuple[str, ...], feedback: str) -> Uplink:
    c = cfg(f"compressor={compressor}", f"feedback={feedback}", *extra)
    options = ["compressor.ratio=0.25"] if "ratio" in c.compressor else []
    c = cfg(f"compressor={compressor}", f"feedback={feedback}", *extra, *options)
    return Uplink(make(c.compressor), make(c.feedback))


def uplink_scenario(uplink: Uplink) -> Callable[[str], Any]:
    """Node side: three rounds of two nodes, one-vector and two-vector messages (one vector sent
    dense). Server side: the mode each kind of strategy gets (mirror, per node, per node with a
    dense vector), three steps of decode or fold."""
    g = matrix(30, 2, D)
    g2 = matrix(31, 2, 2 * D)
    strategies = [
        FedAvg(client=LocalSGD()),
        FedAvg(client=LocalSGD(), aggregator=Median()),
        Scaffold(client=ScaffoldClient()),  # control vector dense
        Scaffold(client=ScaffoldClient(), control_uplink="compressed"),
    ]
    rows = [matrix(40 + r, 4, 2 * D) for r in range(3)]
    params = matrix(50, 1, D)[0]
    facts = run_facts(6, sizes=np.arange(1, 7))

    def run(device: str) -> Any:
        out = []
        one, two = {}, {}
        for r in range(3):
            for node in (0, 1):
                ctx = ClientContext(r, node, 7, 10)
                sent = uplink.encode(g[node].to(device) * (r + 1), one.get(node), ctx, LAYER_SIZES)
                one[node] = sent[2]
                layout = Layout((Vector("update"), Vector("control", compress=False)), D)
                sent2 = uplink.encode(g2[node].to(device) * (r + 1), two.get(node), ctx, LAYER_SIZES, layout)
                two[node] = sent2[2]
                out += [sent, sent2]
        for strategy in strategies:
            state = uplink.init(params.to(device), strategy, facts)
            layout = message_layout(strategy, D)
            for r in range(3):
                batch = batch_on(device, rows[r][: r + 2, : layout.width], layout=layout, version=r)
                batch = dataclasses.replace(batch, node_ids=torch.tensor([0, 2, 3, 5][: r + 2], device=device))
                mode = uplink.mode(strategy)
                if mode == "per_node":
                    batch, state = uplink.decode(batch, state)
                elif mode == "mirror":
                    batch, state = uplink.fold(batch, state)
                out.append((mode, batch.messages, batch.num_examples, state))
        return out

    return run


@pytest.mark.parametrize("feedback", FEEDBACK)
@pytest.mark.parametrize("case", COMPRESSORS, ids=ids)
def test_uplinks_make_no_tensor_off_their_messages_device(case, feedback):
    run = uplink_scenario(uplink_of(*case, feedback))
    unchanged_in_meta(lambda: run("cpu"))


@pytest.mark.parametrize("case", COMPRESSORS, ids=ids)
@pytest.mark.parametrize("device", DEVICES)
def test_uplinks_run_on_their_messages_device(device, case):
    for feedback in FEEDBACK:
        on_device(uplink_scenario(uplink_of(*case, feedback)), device)


# -- strategy server steps -------------------------------------------------------------------------

STRATEGIES = [(name, ()) for name in stems("strategy")] + [
    ("fedavg", ("strategy/server_opt=fedadam",)),
    ("fedavg", ("strategy/server_opt=fedyogi",)),
    ("fedavg", ("strategy/server_opt=fedadagrad",)),
    ("fedavg", ("strategy/server_opt=adam",)),
    ("fedavg", ("strategy.server_opt.momentum=0.9", "strategy.server_opt.weight_decay=0.01")),
    (
        "robust",
        ("strategy/aggregator=centered_clipping", "strategy.preaggregators=[bucketing,nnm]", "byzantine.num=2"),
    ),
    ("robust", ("strategy/aggregator=krum", "strategy.preaggregators=[clipping,arc]", "byzantine.num=2")),
    ("scaffold", ("strategy/aggregator=median", "byzantine.num=2")),
    ("fednova", ("strategy/aggregator=geometric_median", "byzantine.num=2")),
    ("async_fedavg", ("strategy.importance=time",)),
    ("vrls", ("strategy.calibration=bcts",)),
    ("vrls", ("strategy/aggregator=trimmed_mean", "byzantine.num=1")),
    ("monna", ("strategy/aggregator=centered_clipping", "strategy.aggregator.center=own")),
    ("monna", ("strategy/aggregator=trimmed_mean",)),
]
CLASSES, WIDTH, NODES, MEMBERS = 4, 64, 10, 6


def strategy_of(name: str, extra: tuple[str, ...]) -> Strategy:
    phases = ("strategy.predictor_rounds=1", "strategy.calibration_rounds=1") if name.startswith("vrls") else ()
    declared = () if any(o.startswith("byzantine") for o in extra) else ("byzantine.num=2",) if name == "monna" else ()
    return make(cfg(f"strategy={name}", *phases, *declared, *extra).strategy)


def reports(phase: str, strategy: Any, k: int, seed: int) -> torch.Tensor:
    """VRLS's report rows for the calibrate and estimate phases (as its client packs them)."""
    rng = np_rng(seed, "reports", phase)
    c, out = CLASSES, torch.zeros(k, WIDTH, dtype=torch.float32, device="cpu")
    for i in range(k):
        if phase == "calibrate":
            p = ls.num_calibration_params(strategy.calibration, c)
            A = rng.normal(size=(p, p))
            row = np.concatenate(
                [
                    rng.integers(1, 20, c),
                    rng.integers(0, 5, c * c),
                    [10.0, 12.5],
                    rng.normal(size=p),
                    (A @ A.T + np.eye(p)).ravel(),
                ]
            )
        else:
            row = np.concatenate([rng.dirichlet(np.ones(c)), [20.0, 7.0]])
        out[i, : len(row)] = torch.from_numpy(row).to(torch.float32)
    return out


def strategy_scenario(strategy: Strategy) -> Callable[[str], Any]:
    """Four steps from init: rows (or VRLS's reports in its reporting phases) from 7 of 10 nodes
    with stale base versions, or, peer to peer, every member's model and two Byzantine vectors;
    each step's broadcast and the defence on the step's rows too."""
    p2p = strategy.capabilities.servers == frozenset({"p2p"})
    layout = message_layout(strategy, WIDTH)
    if p2p:
        facts = dataclasses.replace(run_facts(NODES - 2, classes=CLASSES), members=tuple(range(MEMBERS)))
        params = matrix(60, MEMBERS, WIDTH)
        k, senders = MEMBERS + 2, list(range(MEMBERS + 2))
    else:
        facts = run_facts(NODES, classes=CLASSES, sizes=np.arange(3, 3 + NODES), probs=np.linspace(0.2, 1.0, NODES))
        params = matrix(60, 1, WIDTH)[0]
        k, senders = 7, [0, 1, 3, 4, 6, 8, 9]
    rows = []
    for r in range(4):
        U = matrix(70 + r, k, layout.width)
        U[:, WIDTH:] = U[:, WIDTH:].abs() + 0.5  # a vector of a few numbers (FedNova's steps) is positive
        rows.append(U)
    reporting = hasattr(strategy, "calibration")  # VRLS
    calibrate = [reports("calibrate", strategy, k, r) for r in range(4)] if reporting else rows
    estimate = [reports("estimate", strategy, k, r) for r in range(4)] if reporting else rows

    def run(device: str) -> Any:
        x = params.to(device)
        state = strategy.init(x, facts)
        out = [state, strategy.broadcast(state)]
        for r in range(4):
            phase = state.get("phase") if isinstance(state, Mapping) else None
            U = {"calibrate": calibrate, "estimate": estimate}.get(phase, rows)[r]
            batch = batch_on(device, U, layout=layout, version=max(r - 1, 0))
            batch = dataclasses.replace(
                batch,
                node_ids=torch.tensor(senders, dtype=torch.int64, device=device),
                num_examples=torch.as_tensor(np.arange(2, 2 + k), dtype=torch.int64, device=device),
                report=phase in ("calibrate", "estimate"),
            )
            info = RoundInfo(r, r + 1, 11, facts.num_nodes, tuple(senders), 2 if p2p else 0)
            defence = strategy.defence(state, info)
            if defence is not None and not batch.report:
                out.append(defence(batch.messages[:, :WIDTH]))
            x, state, metrics = strategy.step(x, batch, state, info)
            out += [x, state, metrics, strategy.broadcast(state)]
        return out

    return run


@pytest.mark.parametrize("case", STRATEGIES, ids=ids)
def test_strategy_server_steps_make_no_tensor_off_the_params_device(case):
    run = strategy_scenario(strategy_of(*case))
    unchanged_in_meta(lambda: run("cpu"))


@pytest.mark.parametrize("case", STRATEGIES, ids=ids)
@pytest.mark.parametrize("device", DEVICES)
def test_strategy_server_steps_run_on_the_params_device(device, case):
    on_device(strategy_scenario(strategy_of(*case)), device)


# -- the strategies' client code --------------------------------------------------------------------


def node_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(4)
    x = torch.randn(40, 5, generator=g, device="cpu")
    y = torch.randint(0, CLASSES, (40,), generator=g, device="cpu")
    return x, y, torch.randn(25, 5, generator=g, device="cpu")


def tiny_model() -> FlatModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return FlatModel(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, CLASSES)))


VECTOR = object()
"""A broadcast entry that is a model-sized vector (SCAFFOLD's c), sent on the node's device."""
VRLS_PHASES = {
    "predictor": {"phase": "predictor", "zeta": 0.1},
    "calibrate": {"phase": "calibrate", "theta": np.array([1.3, 0.1, -0.1, 0.0, 0.0])},
    "estimate_em": {"phase": "estimate", "method": "em", "theta": np.array([1.2]), "prior": np.full(CLASSES, 0.25)},
    "estimate_bbse": {
        "phase": "estimate",
        "method": "bbse",
        "theta": np.zeros(0),
        "prior": np.full(CLASSES, 0.25),
        "confusion": np.eye(CLASSES) * 5 + 1,
    },
    "train": {"phase": "train", "target": np.array([0.1, 0.2, 0.3, 0.4])},
}
CLIENTS: dict[str, Callable[[], tuple[Any, dict[str, Any] | None]]] = {
    **{
        f"vrls_{form}_{phase}": (
            lambda form=form, b=b: (VRLSClient(form=form, batch_size=8, steps=3, lr=0.1, test_sample=12), b)
        )
        for form in ("fedsgd", "local")
        for phase, b in VRLS_PHASES.items()
    },
    "floral_grad_norm": lambda: (FloralSGD(budget=0.25, batch_size=8, steps=3, lr=0.1), None),
    "floral_margin_reverse": lambda: (
        FloralSGD(budget=0.25, influence="margin", flip="reverse", batch_size=8, steps=3, lr=0.1),
        None,
    ),
    "scaffold_I": lambda: (ScaffoldClient(option="I", batch_size=8, steps=3, lr=0.1), {"c": VECTOR}),
    "scaffold_II": lambda: (ScaffoldClient(option="II", batch_size=8, steps=3, lr=0.1, momentum=0.5), {"c": VECTOR}),
    "feddyn": lambda: (FedDynClient(alpha=0.1, batch_size=8, steps=3, lr=0.1), None),
    "fednova": lambda: (FedNovaClient(batch_size=8, steps=3, lr=0.1, momentum=0.5), None),
    "fedprox": lambda: (FedProxClient(mu=0.1, batch_size=8, steps=3, lr=0.1), None),
}


def client_scenario(name: str) -> Callable[[str], Any]:
    """Two rounds of one node (its state carried), with the model and the node's data on the
    device; the broadcast's vectors too."""
    client, broadcast = CLIENTS[name]()
    x, y, xu = node_data()
    c = matrix(80, 1, tiny_model().dim)[0] * 0.01
    models: dict[str, tuple[FlatModel, torch.Tensor]] = {}

    def run(device: str) -> Any:
        model, start = models[device]  # built by `prepare`, outside any meta context
        data = NodeData(x.to(device), y.to(device), xu.to(device))
        b = None if broadcast is None else {k: c.to(device) if v is VECTOR else v for k, v in broadcast.items()}
        out, state = [], None
        for r in range(2):
            model.load(start)
            result = client(model, start, data, state, ClientContext(r, 3, 9, CLASSES, b))
            state = result.state
            out.append(result)
        if isinstance(client, FloralSGD):  # the attacker's move on its own, on a batch of logits
            logits = matrix(81, 16, CLASSES).to(device)
            out.append(client.targets(logits, y[:16].to(device), torch_rng(9, "client-aux", 0, 3)))
        return out

    def prepare(device: str) -> Callable[[str], Any]:
        model = tiny_model().to(device)
        models[device] = model, model.flat.clone()
        return run

    return prepare


@pytest.mark.parametrize("name", list(CLIENTS))
def test_client_code_makes_no_tensor_off_the_nodes_device(name):
    run = client_scenario(name)("cpu")
    unchanged_in_meta(lambda: run("cpu"))


@pytest.mark.parametrize("name", list(CLIENTS))
@pytest.mark.parametrize("device", DEVICES)
def test_client_code_runs_on_the_nodes_device(device, name):
    prepare = client_scenario(name)
    prepare("cpu")
    on_device(prepare(device), device)


COHORTS = [name for name in CLIENTS if CLIENTS[name]()[0].vectorizable]


def cohort_scenario(name: str) -> Callable[[str], Any]:
    """Three nodes at once (`cohort`: the vectorised path; VRLS's reporting phases go one node at
    a time), two of them with as many examples, one with fewer (two groups of steps)."""
    client, broadcast = CLIENTS[name]()
    x, y, xu = node_data()
    cut = [(0, 16), (16, 32), (32, 40)]
    c = matrix(80, 1, tiny_model().dim)[0] * 0.01
    models: dict[str, tuple[FlatModel, torch.Tensor]] = {}

    def run(device: str) -> Any:
        model, start = models[device]
        datas = [NodeData(x[a:b].to(device), y[a:b].to(device), xu[a:b].to(device)) for a, b in cut]
        b = None if broadcast is None else {k: c.to(device) if v is VECTOR else v for k, v in broadcast.items()}
        starts = torch.stack([start, start * 0.5, start + 0.01])
        out, states = [], [None] * len(cut)
        for r in range(2):
            ctxs = [ClientContext(r, k, 9, CLASSES, b) for k in range(len(cut))]
            results = client.cohort(model, starts, datas, states, ctxs)
            states = [res.state for res in results]
            out.append(results)
        return out

    def prepare(device: str) -> Callable[[str], Any]:
        model = tiny_model().to(device)
        models[device] = model, model.flat.clone()
        return run

    return prepare


@pytest.mark.parametrize("name", COHORTS)
def test_cohort_code_makes_no_tensor_off_the_nodes_device(name):
    run = cohort_scenario(name)("cpu")
    unchanged_in_meta(lambda: run("cpu"))


@pytest.mark.parametrize("name", COHORTS)
@pytest.mark.parametrize("device", DEVICES)
def test_cohort_code_runs_on_the_nodes_device(device, name):
    prepare = cohort_scenario(name)
    prepare("cpu")
    on_device(prepare(device), device)
