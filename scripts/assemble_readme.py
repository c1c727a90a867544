"""Fill README.md's generated regions from docs/readme/*.md and the config schema.

Regions are delimited by `<!-- BEGIN name -->` / `<!-- END name -->` (a bare `<!-- name -->` marker is
expanded into such a region the first time). Run after editing a fragment or the config schema:
    python scripts/assemble_readme.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FRAGMENTS = {
    "QUICKSTART": ["quickstart.md"],
    "SECTIONS": ["data.md", "training.md", "eval.md", "models.md", "sampling.md"],
    "STATUS": ["status.md"],
    "BENCHMARKS": ["benchmarks.md"],
}


def region(name: str) -> str:
    if name == "CONFIG_REFERENCE":
        from vldm.config.__main__ import markdown_reference

        return markdown_reference()
    parts = []
    for f in FRAGMENTS.get(name, []):
        p = ROOT / "docs" / "readme" / f
        if p.exists():
            parts.append(p.read_text().strip())
    extra = ROOT / "docs" / "readme" / f"{name.lower()}.md"
    if not parts and extra.exists():
        parts.append(extra.read_text().strip())
    return "\n\n".join(parts)


def main() -> None:
    path = ROOT / "README.md"
    text = path.read_text()
    for name in ("STATUS", "QUICKSTART", "SECTIONS", "CONFIG_REFERENCE", "BENCHMARKS"):
        body = region(name)
        block = f"<!-- BEGIN {name} -->\n{body}\n<!-- END {name} -->"
        pat = re.compile(rf"<!-- BEGIN {name} -->.*?<!-- END {name} -->", re.S)
        if pat.search(text):
            text = pat.sub(lambda _, b=block: b, text)  # a function: block is literal, not a template
        else:
            text = text.replace(f"<!-- {name} -->", block)
    path.write_text(text)


if __name__ == "__main__":
    main()
