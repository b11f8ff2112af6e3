"""MkDocs hooks (mkdocs.yml `hooks:`): the Methods section of the nav and the list on
docs/methods/index.md are built from the files in docs/methods/, each titled by its first
heading, so a method page added (or not yet added) never breaks `mkdocs build --strict`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

MARKER = "<!-- method pages -->"


def _method_pages(docs_dir: Path) -> list[tuple[str, str]]:
    """(title, path relative to docs/) of every method note, index first."""
    pages = []
    for f in sorted((docs_dir / "methods").glob("*.md")):
        if f.name == "index.md":
            continue
        m = re.search(r"^# (.+)$", f.read_text(encoding="utf-8"), flags=re.M)
        pages.append((m.group(1).strip() if m else f.stem, f"methods/{f.name}"))
    return pages


def on_config(config: Any) -> Any:
    docs_dir = Path(config["docs_dir"])
    nav = config.get("nav") or []
    for item in nav:
        if isinstance(item, dict) and "Methods" in item:
            item["Methods"] = [{"Overview": "methods/index.md"}] + [{t: p} for t, p in _method_pages(docs_dir)]
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri == "methods/index.md" and MARKER in markdown:
        items = [f"- [{t}]({Path(p).name})" for t, p in _method_pages(Path(config["docs_dir"]))]
        markdown = markdown.replace(MARKER, "\n".join(items))
    return markdown
