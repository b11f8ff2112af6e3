"""The config reference: every group, option and key of conf/ has a one-line description (a
comment in its YAML), docs/config.md is what scripts/config_reference.py writes from conf/ today,
and ``python -m fedsim --help`` lists the groups with their descriptions."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from fedsim import confdoc

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def _reference():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_key_has_a_description():
    missing = confdoc.undocumented(CONF)
    assert not missing, (
        "add a trailing `# meaning` comment to each (a group: on the defaults entry that chooses it; an option: "
        "a leading comment):\n  " + "\n  ".join(missing)
    )


def test_every_group_and_option_is_covered():
    top_keys, groups = confdoc.load(CONF)
    folders = {p.parent.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml") if p.parent != CONF}
    assert {g.name for g in groups} == folders
    for g in groups:
        assert {o.name for o in g.options} == {p.stem for p in (CONF / g.name).glob("*.yaml")}
    assert {"seed", "num_nodes", "rounds"} <= {k.path for k in top_keys}


def test_parser_reads_nested_keys_lists_and_comments():
    text = (
        "# Header line one.\n#   python -m fedsim x=1\n\n_target_: a.B\nlr: 0.1   # the step\n"
        "# above\nmu: 2\nclient:\n  beta: 0.9   # momentum\ncallbacks:\n  - _target_: c.D\n    mode: x  # m\n"
        "url: 'a # b'  # quoted\n"
    )
    header, keys, _, _ = confdoc.parse_yaml(text)
    assert header.splitlines() == ["Header line one.", "  python -m fedsim x=1"]
    docs = {k.path: k.doc for k in keys}
    assert docs["lr"] == "the step" and docs["mu"] == "above" and docs["client.beta"] == "momentum"
    assert docs["callbacks.0.mode"] == "m" and docs["url"] == "quoted"
    assert {k.path: k.value for k in keys}["url"] == "'a # b'"
    assert not {k.path: k.leaf for k in keys}["client"]


def test_docs_config_md_is_up_to_date():
    expected = _reference().render(CONF)
    actual = (ROOT / "docs" / "config.md").read_text()
    assert actual == expected, "docs/config.md is stale: run .venv/bin/python scripts/config_reference.py"


def test_help_lists_groups_with_descriptions():
    out = subprocess.run(
        [sys.executable, "-m", "fedsim", "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    _, groups = confdoc.load(CONF)
    for g in groups:
        assert any(line.split()[:1] == [g.name] and g.doc[:40] in line for line in out.stdout.splitlines()), g.name
    assert "docs/config.md" in out.stdout
    assert len(out.stdout.splitlines()) <= 40  # one screen
    assert "powered by Hydra" not in out.stdout
    one = subprocess.run(
        [sys.executable, "-m", "fedsim", "--help", "strategy"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert one.returncode == 0 and "fedprox" in one.stdout and "FedProx" in one.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "fedsim", "--help", "nosuch"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert bad.returncode == 2 and "no config group 'nosuch'" in bad.stderr
