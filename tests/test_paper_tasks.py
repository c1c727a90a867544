"""The paper's conditional models as tasks: the inputs they build, and a few training steps of each."""

from __future__ import annotations

import pytest
import torch
from paper_helpers import changed, snapshot, tiny_unet, train_a_few_steps

from vldm.config.core import ConfigError
from vldm.sample.tiny import stage_model
from vldm.tasks import get_task
from vldm.tasks.paper import context_condition, key_frame_mask


def test_predict_inputs_mask_first_s_frames_and_loss_on_the_rest():
    task = get_task("predict", context_frames=[2])
    z = torch.randn(3, 4, 6, 4, 4)
    inp = task.training_inputs(z, {}, torch.Generator().manual_seed(0))
    cond = inp.model_kwargs["temporal_cond"]
    assert cond.shape == (3, 5, 6, 4, 4)
    assert torch.equal(cond[:, 4, :2], torch.ones(3, 2, 4, 4)) and not cond[:, 4, 2:].any()
    assert torch.equal(cond[:, :4, :2], z[:, :, :2]) and not cond[:, :4, 2:].any()
    assert inp.loss_mask[:, 0, :, 0, 0].tolist() == [[0, 0, 1, 1, 1, 1]] * 3
    assert task.required_temporal_options() == {"temporal_cond_channels": 5}


def test_predict_draws_s_from_0_1_2_and_all_frames_option():
    task = get_task("predict", loss_frames="all")
    inp = task.training_inputs(torch.randn(64, 4, 5, 2, 2), {}, torch.Generator().manual_seed(0))
    s = inp.model_kwargs["temporal_cond"][:, 4, :, 0, 0].sum(1)
    assert set(s.tolist()) == {0.0, 1.0, 2.0}
    assert inp.loss_mask is None
    with pytest.raises(ConfigError):
        get_task("predict", context_frame=[1])  # unknown option


def test_interpolate_inputs_both_stages():
    task = get_task("interpolate", window=5, context_dropout=0.0)
    z = torch.arange(17.0).reshape(1, 1, 17, 1, 1).expand(2, 4, 17, 2, 2).contiguous()
    seen = set()
    for seed in range(12):
        inp = task.training_inputs(z, {"meta": [{"fps": 16.0}] * 2}, torch.Generator().manual_seed(seed))
        stage = int(inp.model_kwargs["conditions"]["stage"][0])
        seen.add(stage)
        clip = inp.target_latents[0, 0, :, 0, 0]
        assert len(clip) == 5
        assert torch.all(clip.diff() == (1 if stage == 1 else 4))  # stage 0 = every 4th frame
        assert inp.model_kwargs["conditions"]["fps"].tolist() == [16.0 if stage == 1 else 4.0] * 2
        mask = inp.model_kwargs["temporal_cond"][0, 4, :, 0, 0]
        assert mask.tolist() == [1, 0, 0, 0, 1]
        assert inp.loss_mask[0, 0, :, 0, 0].tolist() == [0, 1, 1, 1, 0]
    assert seen == {0, 1}
    assert task.required_temporal_options() == {"temporal_cond_channels": 5, "scalar_conds": ("fps", "stage")}
    with pytest.raises(ValueError, match="needs clips of 17 frames"):
        task.training_inputs(torch.randn(1, 4, 9, 2, 2), {}, torch.Generator().manual_seed(1))


def test_upsample_inputs_patches_and_noise_levels():
    task = get_task("upsample", patch_size=2)
    pixels = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    z = torch.randn(2, 4, 3, 4, 4)
    inp = task.training_inputs(z, {"pixels": pixels}, torch.Generator().manual_seed(0))
    assert inp.target_latents.shape == (2, 4, 3, 2, 2) and inp.extra_channels.shape == (2, 3, 3, 2, 2)
    assert (0 <= inp.model_kwargs["unet_class_labels"]).all() and (inp.model_kwargs["unet_class_labels"] <= 350).all()
    t = get_task("upsample", condition_via="temporal")
    assert t.required_temporal_options() == {"extra_in_channels": 3, "scalar_conds": ("noise_level",)}
    inp = t.training_inputs(z, {"pixels": pixels}, torch.Generator().manual_seed(0))
    assert set(inp.model_kwargs["conditions"]) == {"noise_level"} and inp.extra_channels.shape == (2, 3, 3, 4, 4)


def test_context_condition_format():
    z = torch.randn(1, 4, 9, 2, 2)
    mask = key_frame_mask(9, 4)[None]
    c = context_condition(z, mask)
    assert torch.equal(c[:, :4, ::4], z[:, :, ::4]) and not c[:, :4, 1::4].any()


@pytest.mark.parametrize(
    "task,options,frames,extra",
    [
        ("predict", {}, 6, {}),
        ("interpolate", {"window": 5}, 17, {"meta": [{"fps": 8.0}] * 2}),
        ("upsample", {"condition_via": "temporal", "patch_size": 2}, 3, "pixels"),
    ],
)
def test_each_model_trains_a_few_steps_only_temporal_parameters_change(task, options, frames, extra):
    unet = tiny_unet()
    stage = stage_model(unet, task, options)
    model = stage.model
    z = torch.randn(2, 4, frames, 4, 4)
    batch = {"pixels": torch.rand(2, 3, frames, 16, 16) * 2 - 1} if extra == "pixels" else extra
    trainable = torch.nn.ModuleDict({"temporal": model.temporal, "conditioning": model.conditioning})
    before_unet, before_t = snapshot(model.unet), snapshot(trainable)
    losses = train_a_few_steps(model, get_task(task, **options), z, batch, steps=2)
    assert all(map(lambda v: v == v and v < 1e3, losses))
    assert not changed(before_unet, model.unet)  # the frozen image model
    moved = changed(before_t, trainable)
    assert any(
        k.startswith(("conditioning.cond_encoder", "conditioning.extra_in")) for k in moved
    )  # the condition learns
    assert len(moved) > len(before_t) // 2


def test_upsampler_on_an_upscaler_unet_trains():
    """SD x4 layout: low-res channels inside the image UNet's own input, noise level as its class label."""
    unet = tiny_unet(in_channels=7, num_class_embeds=351)
    stage = stage_model(unet, "upsample", {"patch_size": 2})
    before = snapshot(stage.model.unet)
    z = torch.randn(1, 4, 3, 4, 4)
    losses = train_a_few_steps(
        stage.model, get_task("upsample", patch_size=2), z, {"pixels": torch.rand(1, 3, 3, 16, 16)}, steps=2
    )
    assert all(v == v for v in losses) and not changed(before, stage.model.unet)


def test_context_gap_sees_whether_a_prediction_model_reads_its_context():
    from vldm.paper.context_gap import context_gap

    stage = stage_model(tiny_unet(), "predict", clip_frames=6, size=16)
    z, text = torch.randn(2, 4, 6, 4, 4), torch.randn(2, 3, 32)
    projs = [b.cond_proj for b in stage.model.temporal.values() if getattr(b, "cond_proj", None) is not None]
    assert projs
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a condition path of a trained model's size: the context changes the loss
        for p in projs:
            p.weight.copy_(torch.randn(p.weight.shape, generator=g) * 0.3)
    used = context_gap(stage, z, text, s=2, repeats=1)
    assert all(b["context"] != b["no_context"] for b in used.values())
    with torch.no_grad():  # no path from the condition to the features: identical losses with and without it
        for p in projs:
            p.weight.zero_()
            p.bias.zero_()
    ignored = context_gap(stage, z, text, s=2, repeats=1)
    assert all(b["context"] == b["no_context"] and b["ratio"] == 1.0 for b in ignored.values())


def test_the_preflight_validates_task_options_without_torch_and_knows_every_registered_task():
    """The sbatch script runs `python -m vldm.train ... --print run_dir` before any rank starts: for the paper's
    tasks it must not pay torch + diffusers imports (~20 s per job under load), and a bad option still fails there,
    naming the key."""
    import subprocess
    import sys

    from train_helpers import ROOT

    from vldm.config.tasks import TASK_OPTIONS
    from vldm.tasks import _REGISTRY

    assert set(TASK_OPTIONS) == set(_REGISTRY)  # one list of the built-in tasks and their options
    for name, cls in _REGISTRY.items():
        assert TASK_OPTIONS[name] is getattr(cls, "options_cls", None), name
    probe = (
        "import sys; from vldm.train.__main__ import main; rc = main(sys.argv[1:]); "
        "print('IMPORTED', sorted(m for m in ('torch', 'diffusers') if m in sys.modules)); sys.exit(rc)"
    )
    for cfg in ("predict_tiny.yaml", "interpolate_tiny.yaml", "upsample_tiny.yaml"):
        ok = subprocess.run(
            [sys.executable, "-c", probe, "--config", f"configs/{cfg}", "--print", "run_dir"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ok.returncode == 0 and "IMPORTED []" in ok.stdout, (cfg, ok.stdout, ok.stderr)
    bad = subprocess.run(
        [sys.executable, "-m", "vldm.train", "--config", "configs/predict_tiny.yaml", "task_options.context_frame=[1]"]
        + ["--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "task_options[predict].context_frame" in bad.stderr, bad.stderr
