"""Every option of every config group composes and instantiates; validation catches bad values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.config import GROUPS, validate
from fedsim.contract import Capabilities, Feedback, Strategy
from fedsim.data.base import Dataset, FederatedData
from fedsim.errors import ConfigError
from fedsim.execution.worker import NodeTask, WorkerSpec
from fedsim.logging import Callback
from fedsim.models import build_model
from fedsim.seeding import np_rng
from fedsim.simulation import make, make_attack, make_server
from fedsim.uplink import Uplink
from tests.conftest import CONF, compose, run_facts
from tests.data.natural_fixtures import write_leaf, write_npz, write_plays
from tests.data.test_sources import make_cifar_set, make_idx_set

# experiments (global packages choosing many groups at once) are checked job by job in test_sweep.py
OPTIONS = sorted(
    (g.name, f.stem) for g in CONF.iterdir() if g.is_dir() and g.name != "experiment" for f in g.glob("*.yaml")
)


def test_config_groups_are_the_validated_ones():
    assert {g for g, _ in OPTIONS} == set(GROUPS)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_idx_set(root / "MNIST" / "raw", gz=False)
    make_idx_set(root / "FashionMNIST" / "raw", gz=True)
    make_cifar_set(root)
    from fedsim.data import shakespeare

    roles = shakespeare.build_roles(shakespeare.read_plays(write_plays(root / "plays")))
    shakespeare.write_cache(roles, shakespeare.cache_path(str(root)), source="generated plays")
    write_leaf(root / "femnist")
    write_npz(root / "mine.npz")
    return root


def overrides_for(group: str, option: str, root) -> list[str]:
    ov = [f"{group}={option}"]
    if group == "dataset" and option in ("mnist", "fashion_mnist", "cifar10"):
        ov += [f"dataset.root={root}", "dataset.download=false"]
    if group == "dataset" and option == "shakespeare":
        ov += [f"dataset.root={root}"]
    if group == "dataset" and option in ("femnist", "files"):
        ov += [f"dataset.path={root / ('femnist' if option == 'femnist' else 'mine.npz')}"]
    if group == "partition" and option.startswith("vrls_"):
        ov += [f"num_nodes={5 if '5clients' in option else 10}", "nodes_per_round=2"]
    if group == "attack" and option != "none":
        ov += ["byzantine.num=2"]
    if group == "server" and option == "p2p":
        ov += ["strategy=monna"]
    if group == "cluster" and option == "ray":
        ov += ["cluster.num_actors=1"]
    return ov


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(group, option, data_root, request):
    cfg = compose(*overrides_for(group, option, data_root))
    validate(cfg)
    node = cfg[group]
    if group == "dataset":
        ds = make(node)
        # a natural dataset without a test split of its own is split per node by partition=natural
        assert isinstance(ds, Dataset) and len(ds.y_train) > 0 and (len(ds.y_test) > 0 or ds.has_nodes)
    elif group == "partition" and getattr(make(node), "takes_dataset", False):
        from fedsim.data.files import load_files

        natural = make(node)
        ds = load_files(path=str(data_root / "mine.npz"))
        out, part = natural.split(ds, len(natural.select(ds)[0]))
        assert part.num_nodes == 5 and sum(part.sizes()) == len(out.y_train) > 0
    elif group == "partition":
        y = np.repeat(np.arange(10), 50)
        part = make(node)(y, y.copy(), int(cfg.num_nodes), np_rng(0, "partition"))
        assert part.num_nodes == cfg.num_nodes and sum(part.sizes()) > 0
    elif group == "model":
        shape = {
            "mlp": (1, 8, 8),
            "logreg": (1, 8, 8),
            "cifar_cnn": (3, 32, 32),
            "resnet18": (3, 32, 32),
            "lstm": (80,),
        }.get(option, (1, 28, 28))
        model = build_model(make(node), shape, 10, seed=0)
        assert model(torch.zeros(2, *shape)).shape == (2, 10)
    elif group == "strategy":
        strat = make(node)
        assert isinstance(strat, Strategy) and isinstance(strat.capabilities, Capabilities)
        state = strat.init(torch.zeros(200), run_facts(20, probs=np.full(20, 0.5)))
        assert callable(strat.client) and isinstance(state, dict)
    elif group == "attack":
        if option == "none":
            assert not node.get("_target_")
        else:
            attack = make_attack(node)
            if attack.kind == "data":
                y = np.repeat(np.arange(10), 5)
                assert (attack.poison(y, 10, np_rng(0, "poison", 0)) != y).any()
            else:
                honest = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
                rows, _ = attack(
                    honest, 2, rng=torch.Generator().manual_seed(1), defence=lambda U: U.median(dim=0).values
                )
                assert rows.shape == (2, 4)
    elif group == "compressor":
        comp = make(node)
        v = torch.randn(200, generator=torch.Generator().manual_seed(0))
        payload = comp.compress(v, torch.Generator().manual_seed(1), [150, 50])
        out = comp.decompress(payload)
        assert out.shape == v.shape and 0 < comp.nbytes(payload) <= 4 * 200
        assert (out - v).norm() <= v.norm() * (1 + 1e-6)  # contractive on this draw
    elif group == "feedback":
        fb = make(node)
        assert isinstance(fb, Feedback) and fb.name == option
        uplink = Uplink(make(compose("compressor=top_k").compressor), fb)
        strat = make(cfg.strategy)
        state = uplink.init(torch.zeros(5), strat, run_facts(20, sizes=[3] * 20))
        assert uplink.mode(strat) == ("mirror" if fb.estimate else "none") and ("h" in state) == fb.estimate
        msg, nbytes, node = fb.node(torch.ones(5), {}, lambda v: uplink.compressor.compress(v))
        assert msg.shape == (5,) and nbytes > 0 and isinstance(node, dict)
    elif group == "latency":
        lat = make(node).bind(num_nodes=20, seed=0, sizes=np.arange(1, 21))
        times = np.array([[lat.time(i, k) for k in range(5)] for i in range(20)])
        assert lat.mean_times().shape == (20,) and (times > 0).all() and np.isfinite(times).all()
    elif group == "participation":
        counts = np.random.default_rng(0).integers(0, 5, size=(20, 10))
        model = make(node).bind(num_nodes=20, seed=0, label_counts=counts)
        p = model.probabilities(20, 5)
        assert p.shape == (20,) and ((p > 0) & (p <= 1)).all()
        seen = np.zeros(20)
        for t in range(200):
            ids = model(t, 20, 5, np_rng(0, "sample", t))
            assert len(set(ids.tolist())) == len(ids) and np.all(np.diff(ids) > 0)
            seen[ids] += 1
        assert abs(seen.sum() / 200 - p.sum()) < 0.35 * p.sum()  # about sum p_n nodes per round
    elif group == "server":
        server, device = make_server(node)
        assert device.type in ("cpu", "cuda")
        assert server.rounds == cfg.rounds and server.num_nodes == cfg.num_nodes
        assert getattr(server, "nodes_per_round", cfg.nodes_per_round) == cfg.nodes_per_round
    elif group == "cluster":
        if option == "ray":
            request.getfixturevalue("ray_cluster")
        from fedsim.data.sources import load_digits
        from fedsim.models import MLP

        ds = load_digits()
        fed = FederatedData(ds, make(cfg.partition)(ds.y_train, ds.y_test, 4, np_rng(0, "partition")))
        strat = make(cfg.strategy)
        executor = make(node)(WorkerSpec(MLP, (1, 8, 8), 10, strat.client, 0), fed)
        try:
            params = torch.nn.utils.parameters_to_vector(build_model(MLP, (1, 8, 8), 10, seed=0).parameters()).detach()
            res = executor.run_round(params, 0, [NodeTask(0), NodeTask(3)])
            assert res.node_ids == [0, 3]
        finally:
            executor.shutdown()
    elif group == "logger":
        callbacks = make(node.callbacks)
        assert callbacks and all(isinstance(cb, Callback) for cb in callbacks)
    else:  # pragma: no cover - a new group needs a case here
        pytest.fail(f"no instantiation check for group {group}")


@pytest.mark.parametrize(
    "override,message",
    [
        ("num_nodes=0", "num_nodes=0 must be >= 1"),
        ("nodes_per_round=30", "exceeds num_nodes=20"),
        ("rounds=-2", "rounds=-2 must be >= 1"),
        ("seed=abc", "must be an integer"),
        ("eval_every=-1", "eval_every=-1"),
    ],
)
def test_validation_names_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(override))


def test_errors_inside_constructors_surface_as_config_errors():
    with pytest.raises(ConfigError, match="client lr=-1"):
        make(compose("strategy.client.lr=-1").strategy)
    with pytest.raises(ConfigError, match="partition.alpha"):
        make(compose("partition.alpha=-0.5").partition)
