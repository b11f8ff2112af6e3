"""The examples of README.md and docs/tutorial.md run: every fedsim command of their ```bash blocks
is run with tiny overrides (2 rounds, in-process, sweeps one job after another with two seeds and
one variant), so an example that breaks fails CI. Commands that cannot run here are skipped with a
listed reason (SKIPS), never silently; every other command must be covered.

Marked ``examples`` (``-m "not examples"`` leaves them out); about a minute on 2 cores.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("README.md", "docs/tutorial.md")

pytestmark = [pytest.mark.examples, pytest.mark.integration]

SKIPS = {
    "cluster.address=HEAD": "needs a running (multi-machine) Ray cluster at HEAD:6379 and its token",
    "cluster.gpus_per_actor": "needs a Ray cluster with GPUs",
    "dataset=cifar10": "needs the CIFAR-10 files (absent in CI) and a GPU to be quick",
}
"""A substring of the command -> why it is not run here."""

TINY = {"rounds": "2", "eval_every": "1", "cluster": "local"}
"""Overrides that replace the example's own values (Hydra refuses a key given twice)."""


def _blocks(text: str) -> list[str]:
    """The ```bash blocks of a markdown file, indented ones (inside list items) included."""
    return [m.group(2) for m in re.finditer(r"^( *)```bash\n(.*?)^\1```", text, flags=re.S | re.M)]


def _commands(block: str) -> list[list[str]]:
    """A block's commands, continuation lines joined, comments dropped."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


def _fedsim(words: list[str]) -> bool:
    return words[:1] == ["scripts/run.sh"] or words[:3] in (
        ["python", "-m", "fedsim"],
        ["python", "-m", "fedsim.report"],
    )


def examples() -> list[tuple[str, list[str]]]:
    found = []
    for name in SOURCES:
        for block in _blocks((ROOT / name).read_text()):
            found += [(name, words) for words in _commands(block) if _fedsim(words)]
    return found


def _fashion_mnist() -> bool:
    from fedsim.data.sources import load_fashion_mnist

    try:
        load_fashion_mnist(download=False)
    except Exception:
        return False
    return True


def test_examples_are_found():
    found = examples()
    readme = [w for n, w in found if n == "README.md"]
    tutorial = [w for n, w in found if n == "docs/tutorial.md"]
    assert len(readme) >= 6 and len(tutorial) >= 6, (readme, tutorial)
    assert any("-m" in w[3:] or w[3:4] == ["-m"] for _, w in found)  # a sweep
    assert any(w[:3] == ["python", "-m", "fedsim.report"] for _, w in found)


def _tiny(args: list[str], tmp: Path, index: int, sweeps: dict[str, Path]) -> list[str]:
    """The example's overrides with TINY's values and its outputs under tmp."""
    sweep = "-m" in args or "--multirun" in args
    out, seen = [], set()
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key in TINY:
            arg = f"{key}={TINY[key]}"
        elif eq and key == "seed" and sweep:
            arg = "seed=" + ",".join(value.split(",")[:2])
        elif eq and key == "hydra.sweep.dir":
            sweeps[value] = tmp / f"sweep{index}"
            arg = f"hydra.sweep.dir={sweeps[value]}"
        elif eq and key == "experiment" and sweep:
            text = (ROOT / "conf" / "experiment" / f"{value}.yaml").read_text()
            m = re.search(r"sweep: \{dir: ([^}]+)\}", text)
            assert m, f"experiment {value} declares no hydra.sweep.dir"
            sweeps[m.group(1).strip()] = tmp / f"sweep{index}"
            variant = re.search(r"variants:\n\s+(\w+):", text)
            keys = {a.partition("=")[0] for a in args}
            out += [] if "seed" in keys else ["seed=0"]
            out += [f"variant={variant.group(1)}"] if variant and "variant" not in keys else []
        seen.add(key)
        out.append(arg)
    out += [f"{k}={v}" for k, v in TINY.items() if k not in seen]
    if sweep:
        out += ["hydra/launcher=basic"]
        if not any(a.startswith("hydra.sweep.dir=") for a in out):
            out.append(f"hydra.sweep.dir={sweeps.setdefault(f'sweep{index}', tmp / f'sweep{index}')}")
    else:
        out.append(f"hydra.run.dir={tmp / f'run{index}'}")
    return out


def test_examples_run(tmp_path):
    """Every example in order (a report reads the sweep an earlier example made)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    have_fmnist = _fashion_mnist()
    sweeps: dict[str, Path] = {}
    ran, skipped = [], []
    done: set[tuple[str, ...]] = set()
    for index, (source, words) in enumerate(examples()):
        line = " ".join(words)
        reason = next((why for key, why in SKIPS.items() if key in line), None)
        if reason is None and not have_fmnist and ("fashion_mnist" in line or "_fmnist" in line):
            reason = "needs Fashion-MNIST (/usr/share/datasets/fashion-mnist; CI installs it)"
        if reason:
            skipped.append(f"{source}: {line}: {reason}")
            continue
        if words[:3] == ["python", "-m", "fedsim.report"]:
            args = [str(sweeps.get(a, a)) for a in words[3:]]
            assert all(Path(a).exists() for a in args if not a.startswith("-") and "/" in a), (line, sweeps)
            cmd = [sys.executable, "-m", "fedsim.report", *args]
        else:  # scripts/run.sh is `python -m fedsim` in the project's venv (this interpreter)
            args = _tiny(words[1:] if words[0] == "scripts/run.sh" else words[3:], tmp_path, index, sweeps)
            same = tuple(sorted(a for a in args if not a.startswith("hydra.run.dir=")))
            if same in done:  # e.g. `scripts/run.sh` and `scripts/run.sh cluster=local` after TINY
                continue
            done.add(same)
            cmd = [sys.executable, "-m", "fedsim", *args]
        t0 = time.monotonic()
        result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        print(f"{time.monotonic() - t0:6.1f} s  {line}")
        assert result.returncode == 0, (
            f"{source}: {line}\nran: {shlex.join(cmd)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        )
        ran.append(line)
    print(f"\n{len(ran)} examples ran; skipped {len(skipped)}:\n  " + "\n  ".join(skipped))
    assert ran
