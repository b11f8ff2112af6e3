"""The GPU benchmark's pieces that a CPU can check: pfl-research's CNN (W3's model), bench.py's
W3/W4 workloads (the fedsim run and the bare loop do the same node-rounds), and gpu_check.sh's
answer on a machine without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from fedsim.models import PflCNN, build_model
from tests.conftest import compose

ROOT = Path(__file__).resolve().parent.parent


def test_pfl_cnn_has_pfl_researchs_layers():
    model = build_model(instantiate(compose("model=pfl_cnn").model), (3, 32, 32), 10, seed=0)
    sizes = [tuple(p.shape) for p in model.parameters()]
    assert sizes == [(32, 3, 3, 3), (32,), (64, 32, 3, 3), (64,), (128, 12544), (128,), (10, 128), (10,)]
    assert sum(p.numel() for p in model.parameters()) == 1_626_442
    assert not list(model.buffers())
    assert model(torch.zeros(4, 3, 32, 32)).shape == (4, 10)


def test_pfl_cnn_is_vectorisable_and_rejects_flat_inputs():
    from torch.func import functional_call, vmap

    model = PflCNN((1, 28, 28), 10)
    params = {k: v.detach().unsqueeze(0).expand(3, *v.shape) for k, v in model.named_parameters()}
    out = vmap(lambda p, x: functional_call(model, p, (x,)))(params, torch.zeros(3, 2, 1, 28, 28))
    assert out.shape == (3, 2, 10)
    with pytest.raises(Exception, match="image inputs"):
        PflCNN((20,), 10)


def _bench(*args: str, tmp_path: Path) -> dict:
    path = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), *args, "--json", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"stdout": proc.stdout, **json.loads(path.read_text())}


@pytest.mark.integration
def test_bench_w4_scaled_runs_the_same_node_rounds_as_its_bare_loop(tmp_path):
    out = _bench("--workload", "w4", "--examples", "4", "--rounds", "2", "--warmup", "1", tmp_path=tmp_path)
    assert "W4 SCALED: 4 images per node" in out["stdout"]
    assert out["scaled"] is True and out["examples_per_node"] == 4 and out["device"] == "cpu"
    assert out["sim_samples"] == out["bare_samples"] == 40  # 10 nodes x 4 images, one steady round
    assert out["ratio"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_SITE": str(tmp_path / "site")}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith("gpu_check: no GPU here")
