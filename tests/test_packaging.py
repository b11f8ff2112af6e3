"""fedsim as a library: a wheel built from this checkout, installed into a fresh virtual
environment (the heavy dependencies reused from the test venv through a .pth file), gives a
working ``fedsim`` command and ``python -m fedsim`` with the configs and plug-ins shipped."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_every_config_folder_is_a_package_of_the_wheel():
    """Each folder of conf/ is listed in pyproject.toml's packages (a new config group that is not
    would be left out of the wheel, with a setuptools warning)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = [p for p in sorted((ROOT / "conf").rglob("*")) if p.is_dir()]
    wanted = {"fedsim.conf", *("fedsim.conf." + ".".join(p.relative_to(ROOT / "conf").parts) for p in folders)}
    assert wanted <= listed, sorted(wanted - listed)


def test_a_wheel_in_a_fresh_venv_runs(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT), "-w", str(wheels)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr
    assert "absent from the `packages` configuration" not in build.stderr  # no warning per config folder
    (wheel,) = wheels.glob("fedsim-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(purelib, "fedsim_test_deps.pth").write_text("\n".join(deps) + "\n")  # after the venv's own site dir
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [
            str(py),
            "-c",
            "import fedsim, strategies, hydra_plugins.fedsim_plugins as p; print(fedsim.__file__); print(p.__file__)",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    ).stdout.split()
    assert all(w.startswith(str(venv)) for w in where), where  # the wheel's copy, not the checkout
    for i, command in enumerate(([str(venv / "bin" / "fedsim")], [str(py), "-m", "fedsim"])):
        folder = tmp_path / f"run{i}"  # a run folder holds one run
        run = subprocess.run(
            [*command, "rounds=2", "cluster=local", "logger=jsonl", f"hydra.run.dir={folder}"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr
        assert (folder / "metrics.jsonl").read_text().strip().splitlines()[-1].startswith('{"event": "run_end"')
    # users add their own configs: a strategy preset in their own config dir
    mine = tmp_path / "myconf" / "strategy"
    mine.mkdir(parents=True)
    (mine / "my_fedavg.yaml").write_text("defaults:\n  - fedavg\n  - _self_\n\nclient:\n  lr: 0.2\n")
    run = subprocess.run(
        [
            str(py),
            "-m",
            "fedsim",
            f"hydra.searchpath=[file://{tmp_path / 'myconf'}]",
            "strategy=my_fedavg",
            "rounds=1",
            "cluster=local",
            "logger=jsonl",
            f"hydra.run.dir={tmp_path / 'mine'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert '"lr": 0.2' in (tmp_path / "mine" / "metrics.jsonl").read_text().splitlines()[0]
