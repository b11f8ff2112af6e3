"""Rewrite a wheel smaller, for a machine that must be sent its packages (no network, a limit on
what can be copied to it): the files under the given prefixes are left out, and the rest is
stored with LZMA instead of deflate. The RECORD is rewritten to list what is kept, so pip installs
the result as it would the original (Python's ``zipfile``, which pip uses, reads LZMA members).

    python scripts/slim_wheel.py ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl OUT_DIR --drop ray/jars/

Ray 2.60's wheel (79.3 MB) comes out at 35.6 MB without ``ray/jars/`` (Ray's Java workers, which
fedsim never starts); ``scripts/gpu_check.sh`` installs it from its wheel folder like any other.
The wheel keeps its name: the result is the same package, less the dropped files.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import sys
import zipfile
from pathlib import Path


def fail(message: str) -> None:
    """Bad input: one line and exit code 2."""
    print(f"slim_wheel: {message}", file=sys.stderr)
    sys.exit(2)


def slim(wheel: Path, out_dir: Path, drop: list[str]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / wheel.name
    if target.resolve() == wheel.resolve():
        fail(f"{target} would overwrite its input; give another OUT_DIR")
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        records = [n for n in names if n.count("/") == 1 and n.endswith(".dist-info/RECORD")]  # top level only
        if len(records) != 1:
            fail(f"{wheel} is not a wheel (it has {len(records)} .dist-info/RECORD files)")
        record = records[0]
        dropped = [n for n in names if any(n.startswith(p) for p in drop)]
        if drop and not dropped:
            fail(f"nothing in {wheel.name} starts with {', '.join(drop)}; check the prefixes")
        kept = [n for n in names if n not in dropped and n != record]
        rows = []
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_LZMA) as dst:
            for name in kept:
                info = src.getinfo(name)
                data = src.read(info)
                new = zipfile.ZipInfo(name, date_time=info.date_time)
                new.external_attr = info.external_attr  # executables (Ray's raylet, gcs_server) stay so
                new.compress_type = zipfile.ZIP_LZMA
                dst.writestr(new, data)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                rows.append([name, f"sha256={digest}", str(len(data))])
            rows.append([record, "", ""])
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(rows)
            info = src.getinfo(record)
            new = zipfile.ZipInfo(record, date_time=info.date_time)
            new.external_attr = info.external_attr
            new.compress_type = zipfile.ZIP_LZMA
            dst.writestr(new, buf.getvalue())
    before, after = wheel.stat().st_size, target.stat().st_size
    print(
        f"slim_wheel: {target}: {after / 1e6:.1f} MB (was {before / 1e6:.1f} MB; {len(dropped)} files left out)",
        file=sys.stderr,
    )
    return target


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--drop", action="append", default=[], help="leave out the files under this prefix (repeatable)")
    args = ap.parse_args(argv)
    if not args.wheel.is_file():
        fail(f"{args.wheel} is not a file")
    slim(args.wheel, args.out_dir, args.drop)


if __name__ == "__main__":
    main()
