"""The suite hash covers the whole protocol (incl. weight files) and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
from eval_helpers import TinyI3D, save_torchscript, write_real_videos

from vldm.config.core import ConfigError, reference
from vldm.config.eval import EvalSuite
from vldm.eval.suite import load_suite, protocol, sample_seed, sample_spec, suite_hash

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_suites_load_and_every_field_is_documented():
    for y in sorted((ROOT / "configs" / "eval").glob("*.yaml")):
        suite = load_suite(str(y))
        assert suite.name == y.stem
    assert load_suite(str(ROOT / "configs/eval/tiny.yaml")).fvd.enabled is False
    assert [k for k, _, _, h in reference(EvalSuite) if not h] == []


def test_unknown_keys_and_bad_values_are_errors():
    with pytest.raises(ConfigError, match="sampling.num_sampels"):
        load_suite(None, ["sampling.num_sampels=3"])
    with pytest.raises(ConfigError, match="sampling.variants"):
        load_suite(None, ["sampling.variants=[best]"])
    with pytest.raises(ConfigError, match="fvd.weights"):
        load_suite(None, ["fvd.enabled=true"])


def test_hash_changes_with_the_protocol_only():
    h = suite_hash(load_suite())
    assert suite_hash(load_suite()) == h  # stable
    for o in (
        "sampling.steps=11",
        "sampling.seed=1",
        "sampling.guidance_scale=2",
        "sampling.num_samples=9",
        "val_loss.timesteps=[10,20]",
        "video.consistency_size=8",
        "sampling.prompts=[a cat]",
    ):
        assert suite_hash(load_suite(None, [o])) != h, o
    for o in (
        "name=other",
        "pool.num_workers=7",
        "pool.shard_size=2",
        "wandb.project=x",
        "wandb.log_videos=1",
        "fvd.num_frames=8",
    ):  # fvd is disabled: its settings are not part of what is measured
        assert suite_hash(load_suite(None, [o])) == h, o


def test_hash_covers_weight_content_and_real_data_not_paths(tmp_path):
    w = save_torchscript(TinyI3D, tmp_path / "i3d.pt")
    real = write_real_videos(tmp_path / "real", 3, frames=16, size=16)
    over = ["fvd.enabled=true", f"fvd.weights={w}", f"real.videos={real}"]
    h = suite_hash(load_suite(None, over))
    proto = protocol(load_suite(None, over))
    assert "weights" not in proto["fvd"] and len(proto["fvd"]["sha256"]) == 64
    moved = tmp_path / "elsewhere.pt"
    moved.write_bytes(w.read_bytes())
    assert suite_hash(load_suite(None, [*over, f"fvd.weights={moved}"])) == h  # same bytes, other path
    save_torchscript(TinyI3D, moved, seed=1)
    assert suite_hash(load_suite(None, [*over, f"fvd.weights={moved}"])) != h  # other weights
    (real / "real_0000.mp4").unlink()
    assert suite_hash(load_suite(None, over)) != h  # other real data
    with pytest.raises(ValueError, match="sha256 mismatch"):
        suite_hash(load_suite(None, [*over, "fvd.sha256=" + "a" * 64]))


def test_sample_seeds_depend_only_on_suite_seed_and_index():
    suite = load_suite()
    seeds = [sample_spec(suite, i)["seed"] for i in range(8)]
    assert len(set(seeds)) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert seeds[5] == sample_seed(0, 5) != sample_seed(1, 5)
    spec = sample_spec(load_suite(None, ["sampling.prompts=[x,y]", "sampling.class_labels=[3,4,5]"]), 4)
    assert (spec["prompt"], spec["label"]) == ("x", 4)


def test_prompts_file_content_is_hashed(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("a cat\n\na dog\n")
    s = load_suite(None, [f"sampling.prompts_file={p}"])
    assert protocol(s)["sampling"]["prompts"] == ["a cat", "a dog"]
    h = suite_hash(s)
    p.write_text("a cat\na bird\n")
    assert suite_hash(s) != h
