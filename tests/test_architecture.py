"""The import rules of docs/architecture.md hold in every file: model code is plain PyTorch + diffusers,
each framework has one home, and the layers point one way."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("deepspeed", "ray", "wandb")
# where each framework may be imported (paths relative to the repository root, directories end in /)
FRAMEWORK_HOMES = {
    "deepspeed": ("vldm/train/",),
    "ray": ("vldm/data/pipeline.py", "ray_jobs/"),
    "wandb": ("vldm/train/logger.py", "vldm/eval/wandb_log.py", "vldm/eval/wandb_reader.py"),
}
# vldm package -> vldm packages it must never import ("*": any but the leaf helpers in ALWAYS_ALLOWED)
ALWAYS_ALLOWED = {"io"}  # vldm/io.py: atomic writes, the mp4 writer, W&B run-file framing; imports nothing of vldm
FORBIDDEN = {
    "io": {"*"},
    "config": {"*"},
    "models": {"train", "eval", "sample", "data", "demo"},
    "diffusion": {"train", "eval", "sample", "data", "demo"},
    "tasks": {"train", "eval", "sample", "data", "demo"},
    "data": {"models", "diffusion", "tasks", "train", "eval", "sample", "demo", "checkpoint"},
    "train": {"eval", "sample", "demo"},
    "eval": {"train", "sample", "demo"},
    "sample": {"train", "eval", "demo"},
    "checkpoint": {"train", "eval", "sample", "demo"},
}
DRIVERS = ("data_prep", "ray_jobs", "bench", "tests", "scripts")


def imports(path: Path) -> list[str]:
    """Every absolute module imported anywhere in the file (function-level imports included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def python_files() -> list[Path]:
    files = [p for d in ("vldm", "data_prep", "ray_jobs", "bench") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 50  # the tree was found
    return files


def package_of(path: Path) -> str:
    """vldm/models/video_unet.py -> models; vldm/checkpoint.py -> checkpoint."""
    parts = path.relative_to(ROOT / "vldm").parts
    return parts[0] if len(parts) > 1 else Path(parts[0]).stem


def test_each_framework_is_imported_only_in_its_home():
    wrong = []
    for path in python_files():
        rel = path.relative_to(ROOT).as_posix()
        for mod in imports(path):
            top = mod.split(".")[0]
            if top in FRAMEWORKS and not any(rel == h or rel.startswith(h) for h in FRAMEWORK_HOMES[top]):
                wrong.append(f"{rel} imports {mod}")
    assert wrong == []


def test_vldm_layers_point_one_way():
    wrong = []
    for path in sorted((ROOT / "vldm").rglob("*.py")):
        pkg = package_of(path)
        banned = FORBIDDEN.get(pkg, set())
        for mod in imports(path):
            parts = mod.split(".")
            if parts[0] in DRIVERS:
                wrong.append(f"{path.relative_to(ROOT)} imports the driver/test module {mod}")
            if parts[0] != "vldm" or len(parts) < 2 or parts[1] == pkg:
                continue
            if parts[1] in ALWAYS_ALLOWED and pkg not in ALWAYS_ALLOWED:
                continue
            if "*" in banned or parts[1] in banned or (parts[1] == "demo" and pkg != "demo"):
                wrong.append(f"{path.relative_to(ROOT)} ({pkg}) imports {mod}")
    assert wrong == []


def test_the_rules_are_the_ones_the_page_states():
    """The page names this test; the rules it lists are the ones checked here."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    assert "tests/test_architecture.py" in page
    for homes in FRAMEWORK_HOMES.values():
        for home in homes:
            assert f"`{home.rstrip('/')}" in page, home
