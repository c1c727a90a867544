"""VideoLDMUNet's saved form and conditioning: format-1 checkpoints load, runtime options are not saved,
image mode stays the image UNet with trained conditioning, a temporal condition needs the res blocks,
user attention processors survive the backend choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import AttnProcessor2_0
from einops import rearrange, repeat
from safetensors.torch import load_file

from vldm.config import ConfigError
from vldm.config.model import ModelConfig, TemporalOptions
from vldm.models import VideoLDMUNet
from vldm.models import attention as attention_dispatch
from vldm.models.attention import SpatialAttnProcessor
from vldm.models.base import Components, build_video_unet
from vldm.models.temporal import MergeFactor
from vldm.tasks import get_task
from vldm.train.build import merge_task_options

FORMAT1 = Path(__file__).parent / "data" / "temporal_format1"
# the fixture's image UNet (tests/data/temporal_format1/make_fixture.py): seed 0, these kwargs
UNET = dict(
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=8,
    attention_head_dim=2,
    norm_num_groups=4,
    sample_size=8,
)
COND = dict(ff_mult=1, extra_in_channels=2, num_class_labels=3, scalar_conds=("fps",), temporal_cond_channels=3)


def fixture_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET).eval()


def train_(model: VideoLDMUNet, seed: int = 1) -> None:
    """Move every trainable weight (temporal layers and conditioning modules) away from init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.temporal_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for m in model.modules():
            if isinstance(m, MergeFactor):
                m.mix_factor.fill_(-1.0)


def fixture_inputs() -> tuple[dict, torch.Tensor]:
    io = load_file(str(FORMAT1 / "io.safetensors"))
    kw = dict(class_labels=io["class_labels"], conditions={"fps": io["fps"]}, temporal_cond=io["temporal_cond"])
    return dict(sample=io["sample"], timestep=io["timestep"], encoder_hidden_states=io["text"], **kw), io["expected"]


def test_format1_checkpoint_loads_with_identical_outputs(tmp_path):
    """Weights saved by the format-1 code (flat keys, GEGLUFeedForward, runtime options in the config)."""
    saved = json.loads((FORMAT1 / "temporal_config.json").read_text())
    assert saved["format_version"] == 1 and saved["temporal"]["attention_backend"] == "math"
    model = VideoLDMUNet.from_unet2d_and_temporal(fixture_unet(), FORMAT1).eval()
    # the old runtime options are not re-applied
    assert (model.opts.attention_backend, model.opts.gradient_checkpointing) == ("auto", "off")
    assert model.opts.attn_max_batch == TemporalOptions().attn_max_batch
    assert isinstance(model.temporal["down0_attn0"].ff, FeedForward)
    assert set(model.conditioning.keys()) == {"cond_encoder", "extra_in", "class_embed", "cond_fps"}
    kw, expected = fixture_inputs()
    with torch.no_grad():
        out = model(**kw)
    # equal up to float32 rounding: the attention kernel and thread count of this process may differ from the
    # fixture's (1.4e-6 seen after other tests); a key mapped wrong would be off by ~1e-1
    assert (out - expected).abs().max().item() <= 1e-5
    # re-saved as format 2: the model's parameter names, no runtime options; loads back identically
    model.save_temporal(tmp_path)
    cfg = json.loads((tmp_path / "temporal_config.json").read_text())
    assert cfg["format_version"] == 2
    assert not {"attention_backend", "attn_max_batch", "gradient_checkpointing"} & set(cfg["temporal"])
    keys = set(load_file(str(tmp_path / "temporal.safetensors")))
    assert {k.split(".")[0] for k in keys} == {"temporal", "conditioning"}
    assert "temporal.down0_attn0.ff.net.0.proj.weight" in keys and "conditioning.cond_encoder.conv_in.weight" in keys
    again = VideoLDMUNet.from_unet2d_and_temporal(fixture_unet(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(**kw), out)


def test_runtime_options_are_not_saved_a_flash_run_samples_on_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback of a flash-trained run")
    trained = VideoLDMUNet.from_unet2d(fixture_unet(), attention_backend="flash", gradient_checkpointing="block")
    train_(trained)
    kw, _ = fixture_inputs()
    kw = {k: v for k, v in kw.items() if k not in ("class_labels", "conditions", "temporal_cond")}
    kw["sample"] = kw["sample"][:, :4]
    with torch.no_grad(), pytest.raises(RuntimeError, match="flash"):
        trained.eval()(**kw)  # the run's own setting cannot run here
    trained.save_temporal(tmp_path / "w")
    assert "attention_backend" not in json.loads((tmp_path / "w" / "temporal_config.json").read_text())["temporal"]
    trained.set_attention_backend("math")
    with torch.no_grad():
        ref = trained(**kw)
        loaded = VideoLDMUNet.from_unet2d_and_temporal(fixture_unet(), tmp_path / "w").eval()
        assert torch.allclose(loaded(**kw), ref, atol=1e-5)
        # the sampler's path: the run's config (attention_backend=flash) + its weights
        cfg = ModelConfig(
            temporal=TemporalOptions(attention_backend="flash", gradient_checkpointing="block"),
            temporal_weights=str(tmp_path / "w"),
        )
        sampler = build_video_unet(cfg, Components(unet2d=fixture_unet())).eval()
        assert sampler.opts.attention_backend == "auto"
        assert torch.allclose(sampler(**kw), ref, atol=1e-5)
        # save_pretrained's config.json holds no runtime option either
        assert "attention_backend" not in dict(sampler.config)["temporal_options"]


def test_image_only_is_the_image_unet_bit_for_bit_with_trained_conditioning():
    unet = fixture_unet()
    model = VideoLDMUNet.from_unet2d(unet, **COND).eval()
    train_(model)
    assert all(p.abs().sum() > 0 for p in model.conditioning.parameters())
    kw, _ = fixture_inputs()
    x, t, text = kw.pop("sample"), kw.pop("timestep"), kw.pop("encoder_hidden_states")
    f = x.shape[2]
    with torch.no_grad():
        ref = unet(
            rearrange(x[:, :4], "b c f h w -> (b f) c h w").contiguous(),
            repeat(t, "b -> (b f)", f=f),
            repeat(text, "b l d -> (b f) l d", f=f),
        ).sample
        ref = rearrange(ref, "(b f) c h w -> b c f h w", f=f)
        assert torch.equal(model(x, t, text, image_only=True, **kw), ref)
        assert torch.equal(model(x, t, text, image_only_indicator=torch.tensor([True]), **kw), ref)
        # the conditioning is live in video mode: dropping it changes the output
        video = model(x, t, text, **kw)
        assert (video - model(x, t, text, temporal_cond=kw["temporal_cond"])).abs().max() > 1e-4
        # a joint batch: the image sample gets the image UNet, the video sample its conditioning
        x2, t2, text2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, text])
        kw2 = dict(
            class_labels=kw["class_labels"].repeat(2),
            conditions={"fps": kw["conditions"]["fps"].repeat(2)},
            temporal_cond=kw["temporal_cond"].repeat(2, 1, 1, 1, 1),
        )
        mixed = model(x2, t2, text2, image_only_indicator=torch.tensor([True, False]), **kw2)
    assert torch.allclose(mixed[:1], ref, atol=1e-5) and torch.allclose(mixed[1:], video, atol=1e-5)


@pytest.mark.parametrize(
    "options", [dict(res_blocks=False), dict(res_blocks=False, temporal_block="animatediff")], ids=["no_res", "ad"]
)
def test_temporal_condition_without_res_blocks_is_refused(options):
    with pytest.raises(ConfigError, match="model.temporal.temporal_cond_channels"):
        TemporalOptions(temporal_cond_channels=3, **options).validate()
    with pytest.raises(ConfigError, match="model.temporal.temporal_cond_channels"):
        VideoLDMUNet.from_unet2d(fixture_unet(), temporal_cond_channels=3, **options)
    # what a prediction run with these options gets: the task adds the condition, the merge refuses it
    with pytest.raises(ConfigError, match="model.temporal.temporal_cond_channels"):
        merge_task_options(TemporalOptions(**options), get_task("predict"))


class RecordingProcessor(AttnProcessor2_0):
    """A user's processor (IP-Adapter-like): changes the output and counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.calls += 1
        return super().__call__(attn, hidden_states, *args, **kwargs) * 1.5


@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
def test_attention_backend_keeps_user_processors(backend):
    unet = fixture_unet()
    name = next(n for n in unet.attn_processors if "attn2" in n)
    mine = RecordingProcessor()
    unet.set_attn_processor({n: (mine if n == name else p) for n, p in unet.attn_processors.items()})
    model = VideoLDMUNet.from_unet2d(unet, attention_backend=backend).eval()
    model.set_attention_backend(backend)
    procs = model.unet.attn_processors
    assert procs[name] is mine
    ours = backend == "math" or (backend == "auto" and attention_dispatch._flash_attn_func is not None)
    assert all(type(p) is (SpatialAttnProcessor if ours else AttnProcessor2_0) for n, p in procs.items() if n != name)
    kw, _ = fixture_inputs()
    with torch.no_grad():
        out = model(kw["sample"][:, :4], kw["timestep"], kw["encoder_hidden_states"])
    assert mine.calls == kw["sample"].shape[0] and out.isfinite().all()
