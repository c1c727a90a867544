"""The README and the pages under docs/ say what the code does: their links resolve, the files, make
targets and entry points they name exist, the options and configs of their commands are accepted as
written, the cheap commands run as written, their Python examples run (or at least import), and the
configuration reference is the generated one."""

from __future__ import annotations

import ast
import glob
import json
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
TOP_DIRS = ("vldm", "data_prep", "ray_jobs", "slurm", "configs", "bench", "scripts", "tests", "docs")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def text_of(page: Path) -> str:
    """The page without HTML comments (they hold notes for maintainers, e.g. links still to come)."""
    return re.sub(r"<!--.*?-->", "", page.read_text(), flags=re.S)


def code_blocks(text: str, lang: str | None = None) -> list[str]:
    return [body for tag, body in FENCE.findall(text) if lang is None or tag == lang]


def prose(text: str) -> str:
    """Text outside fenced blocks and inline code: where links live."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def code_text(text: str) -> list[str]:
    """Every fenced block and inline code span: where commands, paths and make targets are written."""
    spans = re.findall(r"`([^`\n]+)`", FENCE.sub("", text))
    return code_blocks(text) + spans


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"^#{1,6} (.+)$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")  # GitHub numbers repeated headings
    return frozenset(out)


def links(page: Path) -> list[str]:
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose(text_of(page)))


# ---------------------------------------------------------------- links, pages, paths, make targets


def test_readme_is_short_and_links_every_page():
    """A reader goes from the README to any page in one click."""
    assert len(README.read_text().splitlines()) <= 250
    linked = {(README.parent / t.split("#")[0]).resolve() for t in links(README) if not t.startswith("#")}
    assert {p.resolve() for p in PAGES[1:]} - linked == set()
    assert (ROOT / "docs" / "demo_grid.png").resolve() in linked  # the demo picture is shown
    for stage in ("data", "training", "evaluation", "sampling", "models", "architecture"):
        assert (ROOT / "docs" / f"{stage}.md").exists(), stage


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    bad = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor}")
    assert bad == []


def mentioned_paths(page: Path) -> set[str]:
    pat = re.compile(rf"(?<![\w./$-])((?:{'|'.join(TOP_DIRS)})/[\w.*/-]*)")
    found = set()
    for chunk in code_text(text_of(page)) + [prose(text_of(page))]:
        for m in pat.finditer(chunk):
            found.add(m.group(1).rstrip(".,:;"))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_file_named_exists(page):
    missing = [p for p in sorted(mentioned_paths(page)) if not glob.glob(str(ROOT / p))]
    assert missing == []


def test_every_make_target_named_exists():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    named = {
        t for page in PAGES for chunk in code_text(text_of(page)) for t in re.findall(r"\bmake ([a-z][\w-]*)", chunk)
    }
    assert {"demo", "test"} <= named
    assert named - targets == set()


# ---------------------------------------------------------------- commands


def commands() -> list[tuple[str, list[str]]]:
    """(page name, argv) of every command line in the docs' code: blocks (with `\\` continuations joined)
    and inline spans, split at `&&`, `|` and `;`, comments dropped."""
    out = []
    for page in PAGES:
        text = text_of(page)
        chunks = [b.replace("\\\n", " ") for b in code_blocks(text, "bash")] + re.findall(
            r"`([^`\n]+)`", FENCE.sub("", text)
        )
        for chunk in chunks:
            for line in chunk.splitlines():
                try:
                    words = shlex.split(line, comments=True)
                except ValueError:  # an inline span that is not a command (unbalanced quote)
                    continue
                cmd: list[str] = []
                for w in [*words, ";"]:
                    if w in ("&&", "|", ";", "||"):
                        if cmd:
                            out.append((page.name, cmd))
                        cmd = []
                    else:
                        cmd.append(w.strip("[]"))
    return out


def entry_point(argv: list[str]) -> tuple[str, int] | None:
    """(entry point, index of its first argument) of a command line, if it runs one of ours."""
    for i, w in enumerate(argv):
        if w in ("python", "python3") and i + 1 < len(argv):
            if argv[i + 1] == "-m" and i + 2 < len(argv) and argv[i + 2].startswith("vldm"):
                return argv[i + 2], i + 3
            if re.match(r"^(data_prep|ray_jobs|bench)/\w+\.py$", argv[i + 1]):
                return argv[i + 1], i + 2
        if re.match(r"^slurm/\w+\.sbatch$", w) and {"bash", "sbatch"} & set(argv[:i]):
            return w, i + 1
    return None


def documented_calls() -> list[tuple[str, str, list[str]]]:
    calls = []
    for page, argv in commands():
        ep = entry_point(argv)
        if ep:
            calls.append((page, ep[0], argv[ep[1] :]))
    return calls


# the sbatch scripts hand their arguments on: the options they accept are those of the program they run
FORWARDS = {"slurm/eval_pool.sbatch": "ray_jobs/eval_pool.py", "slurm/train_temporal.sbatch": "vldm.train"}

HELP_RUNNER = r"""
import contextlib, io, json, runpy, sys
out = {}
for target in json.loads(sys.argv[1]):
    buf = io.StringIO()
    sys.argv = [target, "--help"]
    code = 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            if target.endswith(".py"):
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code or 0
        except BaseException as e:  # noqa: BLE001 - reported, not raised
            code, _ = repr(e), buf.write(repr(e))
    out[target] = [code, buf.getvalue()]
sys.stdout.write(json.dumps(out))
"""


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """`--help` of every entry point the docs name, as written (the Python ones in one process: they share
    torch's and diffusers' import time)."""
    eps = sorted({ep for _, ep, _ in documented_calls()} | set(FORWARDS.values()))
    py = [ep for ep in eps if not ep.startswith("slurm/")]
    res = subprocess.run(
        [sys.executable, "-c", HELP_RUNNER, json.dumps(py)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = {}
    for ep, (code, text) in json.loads(res.stdout).items():
        assert code == 0, f"{ep} --help: exit {code}\n{text[-2000:]}"
        out[ep] = text
    for ep in eps:
        if ep.startswith("slurm/"):
            r = subprocess.run(["bash", ep, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, f"{ep} --help: exit {r.returncode}\n{r.stderr[-2000:]}"
            out[ep] = r.stdout
    return out


def test_every_entry_point_named_answers_help(helps):
    named = {ep for _, ep, _ in documented_calls()}
    # the stages' entry points are all documented (the list found is not empty by accident)
    assert {
        "vldm.train",
        "vldm.sample",
        "vldm.config",
        "data_prep/shard_videos.py",
        "ray_jobs/eval_pool.py",
        "slurm/train_temporal.sbatch",
        "slurm/eval_pool.sbatch",
    } <= named
    for ep in named:
        assert "usage" in helps[ep].lower() or ep.startswith("slurm/"), ep
        assert len(helps[ep].strip()) > 100, ep


def test_every_option_in_a_documented_command_exists(helps):
    unknown = []
    for page, ep, args in documented_calls():
        text = helps[FORWARDS.get(ep, ep)]
        for a in args:
            opt = a.split("=")[0]
            if re.match(r"^--[a-z][\w-]*$", opt) and not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text):
                unknown.append(f"{page}: {ep} {opt}")
    assert unknown == []


def config_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(config files, key=value overrides) among a documented command's arguments."""
    yamls = [a for a in args if re.match(r"^configs/[\w/]+\.yaml$", a)]
    overrides = [a for a in args if re.match(r"^[a-z_]+(\.[a-z_]+)*=", a) and a != "key=value"]  # not the placeholder
    return yamls, overrides


def test_every_config_named_and_every_override_written_validates():
    """`python -m vldm.config` (training) or the eval pool's loader (suites) accepts every config file the
    docs name, and every documented command's config files with its key=value overrides, as written."""
    from vldm.config import Config, build_config
    from vldm.eval.suite import load_suite

    named = sorted({p for page in PAGES for p in mentioned_paths(page) if re.match(r"^configs/[\w/]+\.yaml$", p)})
    assert "configs/sd15_t2v.yaml" in named and "configs/eval/fvd_ucf.yaml" in named
    for path in named:
        if path.startswith("configs/eval/"):
            load_suite(str(ROOT / path))
        else:
            build_config(Config, [str(ROOT / path)])
    checked = 0
    for _, ep, args in documented_calls():
        yamls, overrides = config_args(args)
        if ep in ("vldm.train", "vldm.config", "slurm/train_temporal.sbatch"):
            build_config(Config, [str(ROOT / y) for y in yamls], overrides)
            checked += bool(overrides)
        elif ep in ("ray_jobs/eval_pool.py", "slurm/eval_pool.sbatch"):
            suite = args[args.index("--suite") + 1] if "--suite" in args else None
            load_suite(str(ROOT / suite) if suite else None, overrides)
            checked += bool(overrides)
    assert checked >= 3  # the README's training and eval commands carry overrides


def run_documented(command: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a command the docs show, exactly as they show it (checked), with this venv's python."""
    shown = [re.sub(r"\s*\\\n\s*", " ", page.read_text()) for page in PAGES]  # continuation lines joined
    assert any(command in text for text in shown), f"not in the docs: {command}"
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[0] = sys.executable
        if argv[1].endswith(".py"):
            argv[1] = str(ROOT / argv[1])
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_configuration_page_is_the_generated_reference():
    res = run_documented("python -m vldm.config --reference")
    assert res.returncode == 0, res.stderr
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == res.stdout, (
        "docs/configuration.md is stale: python -m vldm.config --reference > docs/configuration.md"
    )
    from vldm.config import Config, reference

    assert all(f"`{key}`" in page for key, *_ in reference(Config))


def test_config_commands_run_as_written():
    res = run_documented("python -m vldm.config configs/tiny_cpu.yaml optim.lr=3e-4")
    assert res.returncode == 0, res.stderr
    assert re.search(r"^  lr: 0\.0003$", res.stdout, re.M), res.stdout
    res = run_documented("python -m vldm.train --config configs/tiny_cpu.yaml --check")
    assert res.returncode == 0 and "config OK" in res.stderr, res.stderr
    # the check fails before launch and names the key when the base model is not there (as on this machine)
    sd15 = (
        "python -m vldm.train --config configs/sd15_t2v.yaml model.pretrained=/models/stable-diffusion-v1-5 "
        "data.shards=/data/webvid/shards run_dir=/shared/runs/sd15_t2v --check"
    )
    res = run_documented(sd15)
    if not Path("/models/stable-diffusion-v1-5").is_dir():
        assert res.returncode == 2 and "model.pretrained" in res.stderr, res.stderr


def test_synthetic_corpus_command_runs_as_written(tmp_path):
    cmd = "python data_prep/make_synthetic.py outputs/data/synthetic --count 200 --size 64 --frames 32 --fps 8"
    res = run_documented(cmd, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "outputs" / "data" / "synthetic"
    assert len(list(out.glob("*.mp4"))) == 200 and len(list(out.glob("*.json"))) == 200


# ---------------------------------------------------------------- Python examples


def python_blocks() -> list[tuple[str, str]]:
    return [(page.name, b) for page in PAGES for b in code_blocks(text_of(page), "python")]


def test_readme_api_example_runs(tmp_path):
    text = README.read_text()
    block = re.search(r"## The Video LDM UNet in Python\n\n```python\n(.*?)```", text, re.S).group(1)
    assert len(block.splitlines()) <= 25  # the README's example stays short
    block = block.replace("/tmp/my_temporal_layers", str(tmp_path / "temporal"))
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert (tmp_path / "temporal" / "temporal.safetensors").exists()
    assert scope["frames"].shape == scope["latents"].shape


def test_models_page_unet_example_runs(tmp_path):
    text = (ROOT / "docs" / "models.md").read_text()
    block = re.search(r"## The Video LDM UNet: `VideoLDMUNet`\n.*?```python\n(.*?)```", text, re.S).group(1)
    block = block.replace("/tmp/my_temporal_layers", str(tmp_path / "temporal"))
    scope: dict = {}
    exec(compile(block, "docs/models.md", "exec"), scope)
    assert (tmp_path / "temporal" / "temporal.safetensors").exists()
    assert scope["frames"].shape == scope["latents"].shape
    assert type(scope["personalised"]).__name__ == "VideoLDMUNet"


@pytest.mark.parametrize("page,block", python_blocks(), ids=lambda x: x if isinstance(x, str) and len(x) < 40 else "")
def test_every_python_example_compiles_and_its_imports_exist(page, block):
    """Examples that need trained runs or model files are not run here; their imports are (a renamed API
    fails this), and they must be valid Python."""
    for node in ast.parse(block, page).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            exec(compile(ast.Module(body=[node], type_ignores=[]), page, "exec"), {})
