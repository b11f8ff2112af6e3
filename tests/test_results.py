"""`fedsim.load_run`: a finished run folder from Python: its config, its per-step metrics and its
final model, which classifies the test split exactly as the run's own last evaluation did."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import fedsim
from fedsim.errors import ConfigError
from tests.test_cli import fedsim as run_cli

ARGS = ["dataset=digits", "model=mlp", "rounds=3", "eval_every=1", "cluster=local", "logger=jsonl", "seed=2"]


def test_a_finished_run_loads_with_its_config_metrics_and_final_model(tmp_path):
    out = run_cli(*ARGS, f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    run = fedsim.load_run(tmp_path)
    assert run.finished and run.config.seed == 2 and run.config.model._target_.endswith("MLP")
    rows = run.metrics(frame=False)
    assert [r["round"] for r in rows] == [0, 1, 2] and all("train/loss" in r for r in rows)
    assert run.params().numel() == run.start["info"]["num_params"]

    from fedsim.data.sources import load_digits

    model = run.model()
    ds = load_digits()
    with torch.no_grad():
        pred = model(torch.from_numpy(ds.x_test)).argmax(1).numpy()
    acc = float(np.mean(pred == ds.y_test))
    assert acc == pytest.approx(run.summary["eval/acc"], abs=1e-6)  # the run's own last evaluation
    assert acc == pytest.approx(rows[-1]["eval/acc"], abs=1e-6)


def test_without_a_saved_model_or_a_run_folder_it_says_so(tmp_path, monkeypatch):
    out = run_cli(*ARGS, "save_model=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr
    run = fedsim.load_run(tmp_path / "run")
    with pytest.raises(ConfigError, match="ran with save_model=false"):
        run.model()
    monkeypatch.setitem(sys.modules, "pandas", None)  # pandas absent: records, or one clear error
    assert isinstance(run.metrics(), list)
    with pytest.raises(ConfigError, match="needs pandas"):
        run.metrics(frame=True)
    with pytest.raises(ConfigError, match="not a run folder"):
        fedsim.load_run(tmp_path)
