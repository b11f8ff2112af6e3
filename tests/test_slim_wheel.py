"""scripts/slim_wheel.py: a wheel rewritten without some files installs with pip as the original
does, less those files, with its executables still executable and a RECORD that lists what is
there."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT


def make_wheel(folder: Path) -> Path:
    """A small real wheel: a package with a module, a large data file to drop, an executable and
    a vendored package with a RECORD of its own (as Ray's wheel has)."""
    path = folder / "tinypkg-1.0-py3-none-any.whl"
    files = {
        "tinypkg/__init__.py": b"VALUE = 42\n",
        "tinypkg/jars/big.jar": os.urandom(200_000),
        "tinypkg/bin/tool": b"#!/bin/sh\necho tool ran\n",
        "tinypkg/vendored/dep-1.0.dist-info/RECORD": b"dep/__init__.py,,\n",
        "tinypkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n",
        "tinypkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = io.StringIO()
    csv.writer(record, lineterminator="\n").writerows(
        [[n, "", ""] for n in files] + [["tinypkg-1.0.dist-info/RECORD", "", ""]]
    )
    files["tinypkg-1.0.dist-info/RECORD"] = record.getvalue().encode()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            info.external_attr = (0o100755 if name.endswith("/tool") else 0o100644) << 16  # regular files
            zf.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    return path


def slim(*args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "slim_wheel.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_a_slimmed_wheel_installs_without_the_dropped_files(tmp_path):
    wheel = make_wheel(tmp_path)
    out = slim(wheel, tmp_path / "slim", "--drop", "tinypkg/jars/")
    assert out.returncode == 0, out.stderr
    slimmed = tmp_path / "slim" / wheel.name
    assert "1 files left out" in out.stderr
    assert slimmed.stat().st_size < wheel.stat().st_size / 2  # the random jar was most of it
    with zipfile.ZipFile(slimmed) as zf:
        assert all(i.compress_type == zipfile.ZIP_LZMA for i in zf.infolist())
        record = zf.read("tinypkg-1.0.dist-info/RECORD").decode()
    assert "tinypkg/jars/big.jar" not in record and "sha256=" in record

    target = tmp_path / "site"
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--target",
        str(target),
        str(slimmed),
    ]
    installed = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    assert not (target / "tinypkg" / "jars").exists()
    tool = target / "tinypkg" / "bin" / "tool"
    assert os.access(tool, os.X_OK)
    assert subprocess.run([str(tool)], capture_output=True, text=True).stdout == "tool ran\n"
    value = subprocess.run(
        [sys.executable, "-c", "import tinypkg; print(tinypkg.VALUE)"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert value.stdout.strip() == "42", value.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--drop", "tinypkg/nothing/"], "nothing in tinypkg-1.0-py3-none-any.whl starts with tinypkg/nothing/"),
        ([], "would overwrite its input"),  # OUT_DIR is the wheel's own folder
    ],
)
def test_slim_wheel_refuses_in_one_line(tmp_path, args, needle):
    wheel = make_wheel(tmp_path)
    out_dir = tmp_path if not args else tmp_path / "slim"
    out = slim(wheel, out_dir, *args)
    assert out.returncode == 2 and needle in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert wheel.read_bytes()[:2] == b"PK"  # the input is untouched
