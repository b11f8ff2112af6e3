"""Input checked before anything runs: W&B streaming without credentials (one line, exit 2, no run
folder; the real wandb package, nothing goes online) and a list option given one value (taken as
a one-element list)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.config import check_types, one_element_lists, validate
from fedsim.errors import ConfigError
from fedsim.logging.wandb_logger import WandbLogger, credentials_problem, modes
from tests.conftest import ROOT, compose

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 characters: the shape of a W&B API key


def bare_env(home: Path) -> dict[str, str]:
    """The environment of a machine where nobody logged in to W&B: an empty home, no WANDB_*
    variables, no NETRC."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    home.mkdir(parents=True, exist_ok=True)
    return {**env, "HOME": str(home), "PYTHONPATH": str(ROOT)}


@pytest.fixture
def no_login(tmp_path, monkeypatch):
    """This process, as on a machine where nobody logged in to W&B."""
    for key in [k for k in os.environ if k.startswith("WANDB_")] + ["NETRC"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def fedsim(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedsim", *args], cwd=ROOT, env=env, text=True, capture_output=True, timeout=300
    )


def test_wandb_online_without_credentials_is_one_line_exit_2_and_leaves_no_run_folder(tmp_path):
    out = fedsim(
        "logger=wandb",
        "logger.callbacks.2.mode=online",
        "rounds=1",
        "cluster=local",
        f"hydra.run.dir={tmp_path}/run",
        env=bare_env(tmp_path / "home"),
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith("fedsim: error: "), out.stderr
    assert "logger.callbacks.2.mode=online" in lines[0]
    assert all(fix in lines[0] for fix in ("wandb login", "WANDB_API_KEY", "mode=offline")), lines[0]
    assert not (tmp_path / "run").exists()


def test_wandb_check_passes_with_a_key_in_the_environment(no_login, monkeypatch):
    assert credentials_problem("online") is not None
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert credentials_problem("online") is None
    assert credentials_problem("shared") is None


def test_wandb_check_names_a_malformed_key(no_login, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "abc")
    problem = credentials_problem("online", option="logger.callbacks.2.mode")
    assert problem is not None and "WANDB_API_KEY is not a W&B API key" in problem and "\n" not in problem


def test_wandb_check_reads_the_netrc_entry_of_the_wandb_host(no_login, monkeypatch, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine example.org\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert credentials_problem("online") is not None  # an entry for another host is no W&B key
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")  # what `wandb login` writes
    assert credentials_problem("online") is None
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a private server: its own entry
    assert credentials_problem("online") is not None
    netrc.write_text(f"machine wandb.example.org\n  login user\n  password {FAKE_KEY}\n")
    assert credentials_problem("online") is None


def test_wandb_offline_and_disabled_need_no_key(no_login, monkeypatch):
    for mode in ("offline", "disabled", "dryrun"):
        assert credentials_problem(mode) is None
    assert credentials_problem(None) is not None  # wandb's own default: online
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert credentials_problem(None) is None  # mode: null leaves it to WANDB_MODE
    assert credentials_problem("online") is not None  # an explicit mode wins over WANDB_MODE, as in wandb.init


def test_wandb_bad_mode_is_one_line_listing_the_valid_ones(no_login):
    cfg = compose("logger=wandb", "logger.callbacks.2.mode=onlin")
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert message.startswith("logger.callbacks.2.mode='onlin' is not a W&B mode") and "\n" not in message
    assert all(mode in message for mode in ("online", "offline", "disabled", "shared"))
    assert set(modes()) >= {"online", "offline", "disabled", "shared"}


def test_wandb_bad_setting_in_the_environment_is_named(no_login, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "bogus")
    problem = credentials_problem("offline")  # wandb.init refuses it whatever the mode
    assert problem is not None and "WANDB_MODE" in problem and "\n" not in problem


def test_default_wandb_logger_config_validates_without_credentials(no_login):
    validate(compose("logger=wandb"))  # offline by default: no account needed


def test_one_value_for_a_list_option_is_a_one_element_list():
    cfg = compose(
        "strategy=robust",
        "strategy.preaggregators=nnm",
        "model.hidden=64",
        "logger=wandb",
        "+logger.callbacks.2.tags=paper",
        "dataset=synthetic",
        "dataset.shape=8",
    )
    validate(cfg)
    assert list(cfg.strategy.preaggregators) == ["nnm"]
    assert list(cfg.model.hidden) == [64]
    assert list(cfg.logger.callbacks[2].tags) == ["paper"]
    assert list(cfg.dataset.shape) == [8]
    assert cfg.logger.callbacks[2].mode == "offline"  # a single-value option stays one value
    assert float(cfg.strategy.server_opt.lr) == 0.1


def test_an_option_that_takes_one_value_or_a_list_keeps_the_value_it_takes():
    cfg = compose("attack=label_flip", "byzantine.num=2", "attack.nodes=all")  # nodes: str | list[int] | None
    validate(cfg)
    assert cfg.attack.nodes == "all"
    cfg = compose("attack=label_flip", "byzantine.num=2", "attack.nodes=3")
    validate(cfg)
    assert list(cfg.attack.nodes) == [3]


def test_list_options_already_lists_are_left_alone():
    cfg = compose("strategy=robust", "strategy.preaggregators=[nnm,clipping]", "model=cnn")
    before = (list(cfg.strategy.preaggregators), list(cfg.model.channels), list(cfg.model.hidden))
    one_element_lists(cfg)
    assert (list(cfg.strategy.preaggregators), list(cfg.model.channels), list(cfg.model.hidden)) == before


def test_one_value_that_cannot_be_an_element_is_one_line_with_the_list_syntax():
    check_types(compose("strategy=robust", "strategy.preaggregators=nnm"), compose("strategy=robust"))
    check_types(compose("model.hidden=64"), compose())  # taken as [64], before or after validate
    cfg = compose("model.hidden=abc")
    validate(cfg)
    with pytest.raises(ConfigError, match=r"model.hidden='abc' must be a list, e.g. 'model.hidden=\[128\]'"):
        check_types(cfg, compose())


def test_consumers_take_one_value_as_a_list():
    from strategies.preaggregators import NNM, build_chain

    chain = build_chain("nnm", f=1)
    assert len(chain) == 1 and isinstance(chain[0], NNM)
    assert len(build_chain({"name": "clipping", "c": 5.0}, f=0)) == 1
    assert WandbLogger(tags="paper").tags == ["paper"]


def test_robust_run_with_one_preaggregator_matches_the_bracketed_list(tmp_path):
    common = ["strategy=robust", "rounds=2", "cluster=local", "dataset=digits"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    digests = []
    for i, value in enumerate(["nnm", "[nnm]"]):
        out = fedsim(*common, f"strategy.preaggregators={value}", f"hydra.run.dir={tmp_path}/{i}", env=env)
        assert out.returncode == 0, out.stderr
        last = json.loads((tmp_path / str(i) / "metrics.jsonl").read_text().splitlines()[-1])
        digests.append(last["params_sha256"])
    assert digests[0] == digests[1]
