"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_api_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## The Video LDM UNet in Python\n\n```python\n(.*?)```", text, re.S).group(1)
    block = block.replace("/tmp/my_temporal_layers", str(tmp_path / "temporal"))
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert (tmp_path / "temporal" / "temporal.safetensors").exists()
    assert scope["frames"].shape == scope["latents"].shape
