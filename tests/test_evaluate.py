"""Evaluation on several threads (``eval_threads``): the same metrics, bit for bit, as on one
thread, for the shipped model kinds and for whole runs; the thread count a run picks; bad values
refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from fedsim.config import validate
from fedsim.errors import ConfigError
from fedsim.evaluate import Evaluator
from fedsim.models import MLP, ConvNet, StackedLSTM, build_model
from fedsim.params import FlatModel
from fedsim.simulation import build, eval_threads, set_driver_threads
from tests.conftest import ROOT, Recorder, compose


def evaluator(factory, shape, classes, n, threads, *, batch_size=32, integer_inputs=False):
    rng = np.random.default_rng(0)
    if integer_inputs:
        x = rng.integers(0, classes, size=(n, *shape)).astype(np.float32)
    else:
        x = rng.standard_normal((n, *shape)).astype(np.float32)
    y = rng.integers(0, classes, size=n).astype(np.int64)
    nodes = np.array_split(rng.permutation(n), 5)
    flat = FlatModel(build_model(factory, shape, classes, seed=0))
    return Evaluator(flat, x, y, nodes, batch_size=batch_size, threads=threads), flat.vector()


@pytest.fixture
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the driver runs
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("factory", "shape", "classes", "integer_inputs"),
    [(MLP, (1, 8, 8), 10, False), (ConvNet, (1, 28, 28), 10, False), (StackedLSTM, (80,), 80, True)],
    ids=["mlp", "cnn", "lstm"],
)
@pytest.mark.usefixtures("one_torch_thread")
def test_metrics_are_bit_identical_on_one_and_on_several_threads(factory, shape, classes, integer_inputs):
    one, params = evaluator(factory, shape, classes, 200, 1, integer_inputs=integer_inputs)
    three, _ = evaluator(factory, shape, classes, 200, 3, integer_inputs=integer_inputs)
    assert one.threads == 1 and three.threads == 3
    try:
        for scale in (1.0, 0.5):  # twice: the threads are reused, with other parameters
            p = params * scale
            a, b = one(p), three(p)
            assert a == b
            la, ca = one.per_example(p)
            lb, cb = three.per_example(p)
            assert torch.equal(la, lb) and torch.equal(ca, cb)
    finally:
        three.close()


def test_the_batches_run_on_several_threads():
    ev, params = evaluator(MLP, (1, 8, 8), 10, 256, 4)
    seen: set[str] = set()

    def note(*_):
        seen.add(threading.current_thread().name)
        time.sleep(0.02)  # so that one thread cannot take every batch before the others start

    hook = ev.model.module.register_forward_hook(note)
    try:
        ev(params)
    finally:
        hook.remove()
        ev.close()
    # the first batch runs on the calling thread (the check of the random state), the rest in the pool
    assert len({n for n in seen if n.startswith("fedsim-eval")}) >= 2


# Each pool thread must run torch with the caller's thread count: a new thread starts with torch's
# default (every core), which a convolution would use for its first batch.
THREADS_SCRIPT = """
import os, torch, numpy as np
from fedsim.evaluate import Evaluator
from fedsim.models import ConvNet, build_model
from fedsim.params import FlatModel
torch.set_num_threads(1)
flat = FlatModel(build_model(ConvNet, (1, 28, 28), 10, seed=0))
x = np.random.default_rng(0).standard_normal((256, 1, 28, 28)).astype(np.float32)
ev = Evaluator(flat, x, np.zeros(256, dtype=np.int64), [np.arange(256)], batch_size=32, threads=2)
before = len(os.listdir("/proc/self/task"))
ev(flat.vector())
print(len(os.listdir("/proc/self/task")) - before)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2, reason="needs Linux, 2 cores")
def test_the_evaluation_threads_start_no_threads_of_their_own():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", THREADS_SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert int(out.stdout.strip()) == 2  # the pool's two threads, no OpenMP teams inside them


def test_a_random_forward_pass_falls_back_to_one_thread_with_the_metrics_of_one_thread():
    class Noisy(nn.Module):  # randomness that no module type gives away
        def __init__(self, shape, classes):
            super().__init__()
            self.fc = nn.Linear(int(np.prod(shape)), classes)

        def forward(self, x):
            return self.fc(torch.flatten(x, 1) + 0.1 * torch.randn(x.shape[0], int(np.prod(x.shape[1:]))))

    several, params = evaluator(Noisy, (1, 8, 8), 10, 200, 4)
    one, _ = evaluator(Noisy, (1, 8, 8), 10, 200, 1)
    assert several.threads == 4
    torch.manual_seed(3)
    a = several(params)
    torch.manual_seed(3)
    b = one(params)
    assert several.threads == 1 and several.pool is None
    assert a == b
    short, _ = evaluator(MLP, (1, 8, 8), 10, 64, 8)  # two batches of 32: two threads at most
    assert short.threads == 2


def test_the_thread_count_a_run_picks(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert eval_threads(compose("eval_threads=3")) == 3
    assert eval_threads(compose("cluster=ray", "cluster.num_cpus=5")) == 5
    assert eval_threads(compose("cluster=local")) == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a Ray task's CPUs (a sweep job)
    assert eval_threads(compose("cluster=ray", "cluster.num_cpus=5")) == 2
    assert eval_threads(compose("eval_threads=1")) == 1


@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_bad_eval_threads_are_refused(value):
    with pytest.raises(ConfigError, match="eval_threads"):
        validate(compose(f"eval_threads={value}"))


def test_a_run_reports_the_same_metrics_with_any_number_of_eval_threads():
    # 2,500 test images: three batches of the evaluator's 1,024
    data = ("dataset=synthetic", "dataset.shape=[1,8,8]", "dataset.n_train=1000", "dataset.n_test=2500")

    def run(threads: int):
        set_driver_threads(1)
        sim = build(compose(*data, "cluster=local", "rounds=3", "logger=console", f"eval_threads={threads}"))
        try:
            rec = Recorder()
            state, _ = sim.run([rec])
            evals = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in rec.rounds]
            return evals, state.params.clone(), sim.evaluator.threads
        finally:
            sim.close()

    one, params_one, t1 = run(1)
    three, params_three, t3 = run(3)
    assert (t1, t3) == (1, 3)
    assert len(one) == 3 and all("eval/loss" in r and "eval/node_acc" in r for r in one)
    assert one == three and torch.equal(params_one, params_three)


def test_resume_and_sweeps_let_eval_threads_change():
    from fedsim import checkpoint
    from hydra_plugins.fedsim_plugins.sweeper import _computing, settings

    old = {"rounds": 3, "seed": 0}  # a checkpoint written before the option existed
    assert checkpoint.differences(old, {**old, "eval_threads": 2}) == []
    assert checkpoint.differences(old, {**old, "seed": 1}) == ["seed: 0 -> 1"]
    assert _computing({"seed": 0, "eval_threads": 2}) == {"seed": 0}
    assert settings(["seed=0", "eval_threads=2"]) == {"seed": "0"}
