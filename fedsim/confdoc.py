"""What ``conf/`` documents about itself: groups, options and keys with their defaults and the
one-line meanings written as comments in the YAML files.

Read by ``python -m fedsim --help`` and by ``scripts/config_reference.py`` (which writes
``docs/config.md``). Conventions of the YAML files:

- an option's description is its leading comment block (the first line is its one-line summary);
- a key's description is its trailing ``# ...`` comment, or else the comment lines right above it;
- a group's description is the trailing comment of the defaults entry that chooses it (in
  ``config.yaml``, or, for ``strategy/aggregator`` and ``strategy/server_opt``, in
  ``strategy/fedavg.yaml``).

``_target_``, ``_partial_`` and ``defaults`` are structure, not settings, and need no description.
Experiments (``@package _global_``) set keys documented elsewhere; theirs are optional.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

STRUCTURAL = ("_target_", "_partial_")
"""Keys that name a class or make a partial: documented by the option, not one by one."""


@dataclass
class Key:
    path: str
    value: str
    doc: str
    leaf: bool = True
    line: int = 0


@dataclass
class Option:
    group: str
    name: str
    doc: str
    """The leading comment block, lines kept (indented lines are commands)."""
    summary: str
    keys: list[Key] = field(default_factory=list)
    extends: list[str] = field(default_factory=list)
    is_global: bool = False

    def undocumented(self) -> list[str]:
        """Settings of this option without a description (structure and global packages exempt)."""
        if self.is_global:
            return []
        return [k.path for k in self.keys if k.leaf and not k.doc and k.path.split(".")[-1] not in STRUCTURAL]


@dataclass
class Group:
    name: str
    doc: str
    default: str | None
    options: list[Option]


_KEY = re.compile(r"^(?P<indent>\s*)(?P<dash>-\s+)?(?P<key>[^\s#:'\"][^:#]*?|'[^']*'|\"[^\"]*\"):(?:\s+(?P<rest>.*))?$")


def _split_comment(text: str) -> tuple[str, str]:
    """``value  # comment`` -> (value, comment); a ``#`` inside quotes is part of the value."""
    quote = ""
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].strip(), text[i + 1 :].strip()
    return text.strip(), ""


def parse_yaml(text: str) -> tuple[str, list[Key], list[tuple[str, str, str]], bool]:
    """The header comment, the keys (dotted paths, in file order), the defaults entries
    (group, option, comment) and whether the file is ``@package _global_``.

    A line parser for the subset of YAML that ``conf/`` uses (block mappings, lists of scalars or
    of mappings, flow values on one line), because a YAML loader drops the comments."""
    header: list[str] = []
    in_header = True
    pending: list[str] = []
    keys: list[Key] = []
    defaults: list[tuple[str, str, str]] = []
    is_global = False
    stack: list[tuple[int, str]] = []  # (indent, dotted path) of open keys and list elements
    counters: dict[str, int] = {}
    defaults_indent: int | None = None
    for lineno, raw in enumerate(text.splitlines()):
        line = raw.rstrip()
        stripped = line.strip()
        if not stripped:
            if in_header and header:
                in_header = False
            pending = []
            continue
        if stripped.startswith("#"):
            comment = stripped[1:].removeprefix(" ").rstrip()  # indentation kept: commands in headers
            if comment.strip().startswith("@package"):
                is_global = "_global_" in comment
                continue
            (header if in_header else pending).append(comment if in_header else comment.strip())
            continue
        in_header = False
        indent = len(line) - len(line.lstrip())
        if defaults_indent is not None:
            if indent > defaults_indent or (indent == defaults_indent and stripped.startswith("-")):
                entry, comment = _split_comment(stripped[1:].strip() if stripped.startswith("-") else stripped)
                if ":" in entry and not entry.startswith("override"):
                    group, _, option = entry.partition(":")
                    defaults.append((group.strip().lstrip("/"), option.strip(), comment))
                elif entry and ":" not in entry and entry != "_self_":
                    defaults.append(("", entry, comment))
                pending = []
                continue
            defaults_indent = None
        m = _KEY.match(line)
        if not m:  # a scalar list item or a continuation: part of the value above
            pending = []
            continue
        key = m.group("key").strip().strip("'\"")
        value, comment = _split_comment(m.group("rest") or "")
        if m.group("dash"):
            dash = indent
            while stack and stack[-1][0] >= dash and not (stack[-1][0] == dash and _opens_list(stack[-1][1], keys)):
                stack.pop()
            parent = stack[-1][1] if stack else ""
            index = counters.get(parent, -1) + 1
            counters[parent] = index
            element = f"{parent}.{index}" if parent else str(index)
            stack.append((dash, element))
            indent = dash + len(m.group("dash"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        path = f"{parent}.{key}" if parent else key
        if path == "defaults":
            defaults_indent = indent
            pending = []
            continue
        doc = comment or " ".join(pending)
        pending = []
        keys.append(Key(path=path, value=value, doc=doc, line=lineno))
        stack.append((indent, path))
    parents = {k.path.rsplit(".", 1)[0] for k in keys if "." in k.path}
    for k in keys:
        k.leaf = k.path not in parents and not any(p.startswith(k.path + ".") for p in parents)
    return "\n".join(header), keys, defaults, is_global


def _opens_list(path: str, keys: list[Key]) -> bool:
    """A key written ``key:`` with no value, whose list items may sit at its own indent."""
    return any(k.path == path and not k.value for k in keys)


def load(conf_dir: Path) -> tuple[list[Key], list[Group]]:
    """The top-level keys of ``config.yaml`` and every group (folder) of ``conf_dir``."""
    _, top_keys, top_defaults, _ = parse_yaml((conf_dir / "config.yaml").read_text())
    group_docs = {g: c for g, o, c in top_defaults if g}
    defaults = {g: (o if o != "null" else None) for g, o, c in top_defaults if g}
    groups: list[Group] = []
    folders = sorted(p for p in conf_dir.rglob("*") if p.is_dir() and any(p.glob("*.yaml")) and p.name != "hydra")
    for folder in folders:
        name = folder.relative_to(conf_dir).as_posix()
        options = []
        for f in sorted(folder.glob("*.yaml")):
            header, keys, opt_defaults, is_global = parse_yaml(f.read_text())
            extends = [o for g, o, _ in opt_defaults if not g]
            for g, o, c in opt_defaults:
                full = f"{name}/{g}"
                if g and (conf_dir / full).is_dir() and f.stem == defaults.get(name):
                    group_docs[full], defaults[full] = c, o  # as the parent group's default option chooses it
            summary = header.split("\n", 1)[0].strip()
            doc = header
            options.append(Option(name, f.stem, doc, summary, keys=keys, extends=extends, is_global=is_global))
        groups.append(Group(name, "", defaults.get(name), options))
    for group in groups:
        group.doc = group_docs.get(group.name, "")
    return top_keys, groups


def undocumented(conf_dir: Path) -> list[str]:
    """Every group, option and setting in ``conf_dir`` that has no description."""
    top_keys, groups = load(conf_dir)
    missing = [f"config.yaml: {k.path}" for k in top_keys if k.leaf and not k.doc]
    for g in groups:
        if not g.doc:
            missing.append(f"group {g.name} (a trailing comment on the defaults entry that chooses it)")
        for o in g.options:
            if not o.doc:
                missing.append(f"{g.name}/{o.name}.yaml (a leading comment)")
            missing.extend(f"{g.name}/{o.name}.yaml: {k}" for k in o.undocumented())
    return missing


def help_text(conf_dir: Path, group: str | None = None, width: int = 100) -> str:
    """``python -m fedsim --help``: the groups with their defaults and one-line meanings (one
    screen); with a group name, that group's options."""
    top_keys, groups = load(conf_dir)
    ref = "docs/config.md"
    if group is not None:
        found = [g for g in groups if g.name == group]
        if not found:
            names = ", ".join(g.name for g in groups)
            raise KeyError(f"there is no config group '{group}'; groups: {names}")
        g = found[0]
        lines = [f"{g.name}: {g.doc}", f"choose with {g.name}=OPTION (default: {g.default})", ""]
        wide = max(len(o.name) for o in g.options) + 2
        lines += [_clip(f"  {o.name:<{wide}}{o.summary}", width) for o in g.options]
        lines += ["", f"Every key of every option, with its default and meaning: {ref}"]
        return "\n".join(lines) + "\n"
    lines = [
        "fedsim: a simulator for federated and robust learning. Every option is a Hydra override.",
        "",
        "  python -m fedsim [GROUP=OPTION ...] [KEY=VALUE ...]   one run, into outputs/DATE/TIME/",
        "  python -m fedsim -m KEY=A,B ...                       a sweep (jobs in parallel), into multirun/",
        "  python -m fedsim.report SWEEP_DIR                     mean ± std tables and plots of a sweep",
        "",
        "Config groups (GROUP=OPTION; default in brackets):",
    ]
    labels = [f"{g.name} [{g.default}]" if g.default else g.name for g in groups]
    wide = max(len(n) for n in labels) + 2
    lines += [_clip(f"  {n:<{wide}}{g.doc}", width) for n, g in zip(labels, groups)]
    top = [k.path for k in top_keys if k.leaf]
    lines += [
        "",
        *textwrap.wrap("Top-level keys: " + ", ".join(top), width, subsequent_indent="  "),
        "",
        "  python -m fedsim --help GROUP             the options of one group, one line each",
        "  python -m fedsim --cfg job [OVERRIDES]    the composed config of a run",
        "  python -m fedsim --hydra-help             Hydra's own flags",
        f"Every group, option and key with its default and meaning: {ref}",
    ]
    return "\n".join(lines) + "\n"


def _clip(line: str, width: int) -> str:
    return line if len(line) <= width else line[: width - 3].rstrip() + "..."
