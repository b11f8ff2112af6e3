"""``python -m fedsim.sync``: the commands that upload real offline W&B runs (logger=wandb), a
resumed run's two segments as one run in the order of their rounds, and a sweep's runs in the
order of its jobs. Nothing goes online: the commands are built and printed (--dry-run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedsim import sync
from tests.conftest import ROOT
from tests.test_faults import environment, run

pytestmark = pytest.mark.integration

TINY = ["num_nodes=6", "nodes_per_round=3", "cluster=local", "logger=wandb", "checkpoint.every=1"]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> Path:
    """A real run of 3 rounds, then resumed to 5: two offline segments with one run id."""
    folder = tmp_path_factory.mktemp("resumed") / "run"
    first = run(*TINY, "rounds=3", f"hydra.run.dir={folder}", timeout=600)
    assert first.returncode == 0, first.stderr
    again = run(*TINY, "rounds=5", "resume=true", f"hydra.run.dir={folder}", timeout=600)
    assert again.returncode == 0, again.stderr
    return folder


def test_a_resumed_run_is_one_run_of_two_segments_in_the_order_of_their_rounds(resumed):
    folders = sorted((resumed / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and len({f.name.rsplit("-", 1)[1] for f in folders}) == 1  # one run id
    (one,) = sync.find_runs([resumed])
    assert [s.first_round for s in one.segments] == [0, 3]
    assert [s.folder for s in one.segments] == folders
    together = sync.commands([one], style="together", wandb_cmd=["wandb"])
    assert together == [["wandb", "sync", str(folders[0]), str(folders[1])]]
    append = sync.commands([one], style="append", wandb_cmd=["wandb"], project="p")
    assert append == [
        ["wandb", "sync", "--project", "p", str(folders[0])],
        ["wandb", "sync", "--append", "--project", "p", str(folders[1])],
    ]
    # the same from the run's wandb/ folder, or from a folder above the run
    assert sync.find_runs([resumed / "wandb"])[0].segments == one.segments
    assert sync.find_runs([resumed.parent])[0].segments == one.segments


def test_segments_are_ordered_by_rounds_not_by_their_folder_names(resumed, tmp_path):
    """A clock set back between the two parts: the later rounds' folder sorts first by name."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(resumed, copy)
    first, second = sorted((copy / "wandb").glob("offline-run-*"))
    run_id = first.name.rsplit("-", 1)[1]
    early = second.rename(copy / "wandb" / f"offline-run-20000101_000000-{run_id}")
    (one,) = sync.find_runs([copy])
    assert [s.folder for s in one.segments] == [first, early] and [s.first_round for s in one.segments] == [0, 3]


def test_a_sweep_is_uploaded_run_by_run_in_the_order_of_its_jobs(tmp_path):
    d = tmp_path / "sweep"
    done = run("-m", *TINY[:-1], "rounds=2", "seed=1,0", "hydra/launcher=basic", f"hydra.sweep.dir={d}", timeout=600)
    assert done.returncode == 0, done.stderr
    runs = sync.find_runs([d])
    assert [r.owner.name for r in runs] == ["seed=1", "seed=0"]  # as sweep.json lists the jobs
    assert all(len(r.segments) == 1 for r in runs)
    out = subprocess.run(
        [sys.executable, "-m", "fedsim.sync", str(d), "--dry-run", "--style", "together"],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all(" sync " in line for line in lines)
    assert "seed=1/wandb/offline-run-" in lines[0] and "seed=0/wandb/offline-run-" in lines[1]
    assert "2 W&B run(s), 2 segment(s) (0 resumed run(s)); 2 command(s), style together" in out.stderr


def test_the_dry_run_prints_what_this_wandb_would_run_and_nothing_is_a_clear_error(resumed, tmp_path, capsys):
    sync.main([str(resumed), "--dry-run"])
    printed = capsys.readouterr()
    style = "append" if sync.supports_append(sync._wandb_cmd()) else "together"
    assert f"style {style}" in printed.err
    assert len(printed.out.splitlines()) == (2 if style == "append" else 1)
    with pytest.raises(SystemExit) as exc:
        sync.main([str(tmp_path)])
    assert exc.value.code == 2 and "no offline W&B run under" in capsys.readouterr().err
