"""Issue 16, GPU-ready by construction, proven on CPU: the trained-FLOP count behind perf/mfu, the bf16
numerics of the DeepSpeed config, the host-to-device path, the attention decision, the latent pre-flight
check and the unattended bring-up script (`bench/gpu_check.py --tiny --device cpu`)."""

from __future__ import annotations

import pytest
import torch
from train_helpers import TINY

from vldm.config import Config, ConfigError, build_config
from vldm.train.build import build
from vldm.train.objective import Objective
from vldm.train.perf import count_flops, train_flops
from vldm.train.sources import SyntheticClips


def tiny(*overrides: str) -> Config:
    return build_config(Config, [str(TINY)], list(overrides))


# ------------------------------------------------------------------------------------------- MFU count
@pytest.fixture(scope="module")
def tiny_model():
    cfg = tiny("data.num_frames=3", "data.batch_size=1", "model.temporal.attention_backend=math")
    built = build(cfg)
    return cfg, built, Objective(cfg, built, torch.device("cpu")), next(SyntheticClips(cfg, 0, 1, 4, 4, 4))


@pytest.mark.parametrize("level", ["off", "temporal", "block"])
def test_trained_flops_equal_a_measured_forward_and_backward(level, tiny_model):
    """The count from one forward equals torch's FlopCounterMode over a real forward + backward: frozen
    weights get no weight gradient, layers before the first temporal one no input gradient, and
    checkpointed regions are recomputed (math attention: its matmuls are visible to the counter on CPU)."""
    cfg, built, obj, batch = tiny_model
    built.model.set_gradient_checkpointing(level)
    counted = train_flops(lambda: obj.loss(built.model, batch, 0, 0, 0)[0])
    measured = count_flops(lambda: obj.loss(built.model, batch, 0, 0, 0)[0].backward())
    built.model.zero_grad(set_to_none=True)
    # block: torch stops recomputing a region once its saved tensors are back (the last ops are not rerun)
    assert counted.trained == pytest.approx(measured, rel=0.03 if level == "block" else 1e-9)
    assert counted.encoders == 0
    # frozen spatial weights: far less than the 2x forward of a fully trained model
    assert counted.forward < counted.backward < 2 * counted.forward
    assert (counted.recompute > 0) == (level != "off")
    if level == "block":  # every block recomputed: nearly the whole forward once more
        assert counted.recompute > 0.8 * counted.forward


def test_encoder_flops_are_counted_apart(tmp_path):
    """Pixels through the frozen VAE (no_grad): reported as `encoders`, outside the trained count."""
    from vldm.models.base import build_tiny_base

    base = build_tiny_base(tmp_path / "base")
    cfg = tiny(
        f"model.pretrained={base}", "data.num_frames=2", "data.batch_size=1", "model.temporal.attention_backend=math"
    )
    built = build(cfg)
    obj = Objective(cfg, built, torch.device("cpu"))
    batch = next(SyntheticClips(cfg, 0, 1, 3, 16, 16, "pixels"))
    counted = train_flops(lambda: obj.loss(built.model, batch, 0, 0, 0)[0])
    measured = count_flops(lambda: obj.loss(built.model, batch, 0, 0, 0)[0].backward())
    assert counted.encoders > 0
    assert counted.trained + counted.encoders == measured


# ------------------------------------------------------------------------------------------- bring-up
def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    """`bench/gpu_check.py --tiny --device cpu`: every part of the bring-up script runs and reports."""
    import json
    import subprocess
    import sys

    from train_helpers import ROOT

    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, "bench/gpu_check.py", "--tiny", "--device", "cpu", "--skip-tests", "--steps", "1"]
    cmd += ["--sample-steps", "1"]
    p = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["level"] for r in report["train"]] == ["off", "temporal", "block"]
    for r in report["train"]:
        assert r["status"] == "ok" and r["step_s"] > 0 and 0 <= r["data_wait"] < 1
        assert r["flops"]["forward"] > 0 and r["mfu"] is None  # no peak FLOP/s for a CPU
        assert r["ema_updates"] >= 1  # the EMA of the fp32 masters is part of the timed step
    rec = [r["flops"]["recompute"] for r in report["train"]]
    assert rec[0] == 0 < rec[1] < rec[2]  # checkpointing recomputes more at each level
    assert report["sample"]["status"] == "ok" and report["sample"]["s_per_video"] > 0
    assert "| block |" in p.stdout  # the printed table


# ------------------------------------------------------------------------------------------- bf16 numerics
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_bf16_deepspeed_config_sets_its_numerics_explicitly(stage):
    from deepspeed.runtime.config import DeepSpeedConfig

    from vldm.train.engine import deepspeed_config

    accum = 1 if stage == 0 else 4  # stage 0 with grad_accum > 1 is refused (next test)
    ds = deepspeed_config(
        tiny(f"deepspeed.zero_stage={stage}", f"train.grad_accum={accum}"), world_size=8, precision="bf16"
    )
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True}  # non-finite gradients skip the update
    assert ds["communication_data_type"] == "fp32"
    # fp32 accumulation where DeepSpeed supports it with a bf16 module (ZeRO 1/2)
    assert ds.get("data_types") == ({"grad_accum_dtype": "fp32"} if stage else None)
    one_process = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
    parsed = DeepSpeedConfig({**ds, "train_batch_size": one_process})
    assert parsed.communication_data_type == torch.float32
    assert parsed.bfloat16_config.check_grad_overflow is True
    assert parsed.grad_accum_dtype == ("fp32" if stage else None)
    fp32 = deepspeed_config(tiny(), 8, "fp32")
    assert "bf16" not in fp32 and "communication_data_type" not in fp32


def test_bf16_gradient_accumulation_without_zero_is_refused_before_launch():
    # DeepSpeed 0.19.8 has no fp32 accumulation at ZeRO 0 (grad_accum_dtype fp32 there raises
    # NotImplementedError; without it micro-batch gradients sum in bf16): refused, naming the keys
    from vldm.train.engine import deepspeed_config
    from vldm.train.preflight import check

    bad = tiny("deepspeed.zero_stage=0", "train.grad_accum=4", "deepspeed.precision=bf16")
    for refuse in (lambda: check(bad, cuda=False), lambda: deepspeed_config(bad, 8, "bf16")):
        with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage.*train\.grad_accum=4.*zero_stage=1"):
            refuse()
    # auto precision is bf16 on a GPU only; fp32 accumulates in fp32 anyway; ZeRO 1 accumulates in fp32
    auto = tiny("deepspeed.zero_stage=0", "train.grad_accum=4", "deepspeed.precision=auto")
    with pytest.raises(ConfigError, match="zero_stage"):
        check(auto, cuda=True)
    check(auto, cuda=False)
    check(tiny("deepspeed.zero_stage=1", "train.grad_accum=4", "deepspeed.precision=bf16"), cuda=False)
    check(tiny("deepspeed.zero_stage=0", "train.grad_accum=1", "deepspeed.precision=bf16"), cuda=False)


def test_sampling_state_stays_float32_with_a_bf16_model():
    from vldm.models.base import SD_SCHEDULER
    from vldm.sample.guidance import Conditioning, denoise

    seen = []

    def model(dtype):
        def fn(x, t, encoder_hidden_states):
            seen.append(x.dtype)
            return (0.3 * x + encoder_hidden_states.mean()).to(dtype)

        return fn

    ctx = torch.ones(1, 2, 4)
    cond = Conditioning(cond={"encoder_hidden_states": ctx}, no_text={"encoder_hidden_states": 0 * ctx}, text_scale=5.0)
    ref = denoise(model(torch.float32), (2, 3, 4, 4), [7], dict(SD_SCHEDULER), cond, steps=30)
    seen.clear()
    low = denoise(model(torch.bfloat16), (2, 3, 4, 4), [7], dict(SD_SCHEDULER), cond, steps=30, dtype=torch.bfloat16)
    assert set(seen) == {torch.bfloat16} and low.dtype == torch.bfloat16  # the model sees its dtype
    # only the model's own bf16 rounding differs: the 30 updates of x_t run in fp32
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


# ------------------------------------------------------------------------------------------- attention
def test_flash_attention_is_chosen_per_call_only_where_it_can_run():
    from vldm.models.attention import flash_unsupported

    def qkv(b=2, h=8, s=16, d=40, dtype=torch.bfloat16, kb=None, ks=None, kd=None, kh=None):
        q = torch.zeros(b, h, s, d, dtype=dtype)
        k = torch.zeros(kb or b, kh or h, ks or s, kd or d, dtype=dtype)
        return q, k, torch.zeros_like(k)

    def why(q, k, v, **kw):
        return flash_unsupported(q, k, v, **{"installed": True, "device_type": "cuda", **kw})

    assert why(*qkv()) == ""  # SD-1.5 spatial self-attention: 8 heads of 40
    assert why(*qkv(ks=77)) == ""  # cross-attention to 77 text tokens: other k length is fine
    assert why(*qkv(d=160, h=2)) == ""  # SD-2.1's deepest level (head dim 64) and wide heads up to 256
    assert "head dim" in why(*qkv(d=20))  # not a multiple of 8
    assert "head dim" in why(*qkv(d=512))
    assert "dtype" in why(*qkv(dtype=torch.float32))  # the FLOP count and CPU runs are fp32
    assert "batch" in why(*qkv(kb=1))  # a k/v batch broadcast from the query's
    assert "heads" in why(*qkv(kh=3))
    assert "not installed" in why(*qkv(), installed=False)
    assert "CUDA" in flash_unsupported(*qkv(), installed=True)  # these CPU tensors themselves: never flash


def test_auto_attention_falls_back_to_sdpa_on_cpu():
    from vldm.models.attention import attention, math_attention, resolve_backend

    q, k, v = (torch.randn(3, 2, 5, 8) for _ in range(3))
    assert resolve_backend("auto", q, k=k, v=v) == "sdpa"
    with pytest.raises(RuntimeError, match="cannot run this call"):
        resolve_backend("flash", q, k=k, v=v)
    assert torch.allclose(attention(q, k, v, "auto"), math_attention(q, k, v), atol=1e-5)


# ------------------------------------------------------------------------------------------- host to device
def test_prefetcher_yields_the_same_batches_and_resumes_exactly():
    """One batch in flight (ahead=True, as on CUDA) on CPU tensors: same batches; the saved position is the
    next batch the trainer takes, not the one already drawn into the prefetch slot."""
    from vldm.train.prefetch import DevicePrefetcher

    cfg = tiny("data.batch_size=2", "data.num_frames=2")
    plain = SyntheticClips(cfg, 0, 1, 4, 4, 4)
    expected = [next(plain)["latents"] for _ in range(5)]
    pre = DevicePrefetcher(SyntheticClips(cfg, 0, 1, 4, 4, 4), torch.device("cpu"), ahead=True)
    got = [next(pre)["latents"] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    state = pre.state_dict()
    assert state["batches"] == 3 and pre.source.batches == 4  # batch 4 is in flight, not consumed
    resumed = DevicePrefetcher(SyntheticClips(cfg, 0, 1, 4, 4, 4), torch.device("cpu"), ahead=True)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)["latents"], expected[3]) and torch.equal(next(pre)["latents"], expected[3])


def test_uint8_pixels_are_scaled_on_the_device_like_float_ones(tmp_path):
    """data.pixel_dtype=uint8 (the GPU default): 4x fewer bytes to the device, the same latents there."""
    from vldm.models.base import build_tiny_base

    base = build_tiny_base(tmp_path / "base")
    cfg = tiny(f"model.pretrained={base}", "data.num_frames=2", "data.batch_size=1")
    built = build(cfg)
    obj = Objective(cfg, built, torch.device("cpu"))
    u8 = torch.randint(0, 256, (1, 3, 2, 16, 16), dtype=torch.uint8)
    z8 = obj.latents({"pixels": u8})
    zf = obj.latents({"pixels": u8.float() / 127.5 - 1.0})
    assert torch.allclose(z8, zf)


def test_noise_drawn_on_the_device_keeps_world_size_independence(tiny_model):
    cfg, built, obj, _ = tiny_model
    c4 = tiny("data.batch_size=4", "data.num_frames=3")
    whole = next(SyntheticClips(c4, 0, 1, 4, 4, 4))
    halves = [next(SyntheticClips(tiny("data.batch_size=2", "data.num_frames=3"), r, 2, 4, 4, 4)) for r in (0, 1)]
    with torch.no_grad():
        a = obj.loss(built.model, whole, step=3, micro=1, rank=0)[0]
        b = torch.stack([obj.loss(built.model, h, step=3, micro=1, rank=r)[0] for r, h in enumerate(halves)]).mean()
        again = obj.loss(built.model, whole, step=3, micro=1, rank=0)[0]
    assert torch.allclose(a, b, rtol=1e-5) and torch.equal(a, again)


# ------------------------------------------------------------------------------------------- latent recipe
def _shard(path, exts):
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key in ("abc_0000", "abc_0001"):
            for ext in exts:
                data = b"x"
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_preflight_refuses_latent_recipe_on_shards_without_latents(tmp_path):
    from train_helpers import ROOT

    from vldm.config import ConfigError
    from vldm.train.preflight import check

    base = tmp_path / "sd15"
    for sub in ("unet", "vae"):
        (base / sub).mkdir(parents=True)
    pixels, latents = tmp_path / "pixels", tmp_path / "latents"
    pixels.mkdir(), latents.mkdir()
    _shard(pixels / "shard-000000.tar", ["json", "mp4", "txt"])
    _shard(latents / "shard-000000.tar", ["json", "mp4", "txt", "latents.npy"])

    def sd15(shards):
        over = [f"model.pretrained={base}", f"data.shards={shards}", "wandb.mode=offline"]
        return build_config(Config, [str(ROOT / "configs" / "sd15_t2v.yaml")], over)

    assert sd15(latents).data.use_latents  # the default recipe
    with pytest.raises(ConfigError, match=r"data\.use_latents.*abc_0000\.latents\.npy"):
        check(sd15(pixels))
    # latents, no text embeddings, no text encoder: nothing could encode the captions
    with pytest.raises(ConfigError, match=r"data\.shards.*text embeddings.*text_encoder"):
        check(sd15(latents))
    (base / "text_encoder").mkdir()
    assert any("every caption at every step" in w for w in check(sd15(latents)))
    _shard(latents / "shard-000000.tar", ["json", "mp4", "txt", "latents.npy", "text.npy"])
    assert not any("text embeddings" in w for w in check(sd15(latents)))


# ------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_auto_attention_on_cuda_matches_math(dtype):
    from vldm.models.attention import attention, flash_unsupported, math_attention, resolve_backend

    q, k, v = (torch.randn(4, 8, 16, 40, device="cuda", dtype=dtype) for _ in range(3))
    kind = resolve_backend("auto", q, k=k, v=v)
    assert kind == ("flash" if not flash_unsupported(q, k, v) else "sdpa")
    if dtype == torch.float32:
        assert kind == "sdpa"
    ref = math_attention(q.float(), k.float(), v.float())
    assert (attention(q, k, v, "auto").float() - ref).abs().max() < (2e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prefetcher_on_cuda_delivers_the_same_batches():
    from vldm.train.prefetch import DevicePrefetcher

    cfg = tiny("data.batch_size=2", "data.num_frames=2")
    src = SyntheticClips(cfg, 0, 1, 4, 8, 8)
    plain = SyntheticClips(cfg, 0, 1, 4, 8, 8)
    expected = [next(plain)["latents"] for _ in range(4)]
    pre = DevicePrefetcher(src, torch.device("cuda"))
    assert pre.ahead and pre.pin
    for e in expected:
        got = next(pre)["latents"]
        assert got.is_cuda and torch.equal(got.cpu(), e)


def test_compile_and_channels_last_are_gpu_only_switches():
    from vldm.train.build import apply_device_options

    cfg = tiny("train.compile=true", "train.channels_last=true")
    built = build(cfg)
    before = {n: p.stride() for n, p in built.model.named_parameters()}
    assert apply_device_options(built.model, cfg, torch.device("cpu")) == []  # nothing on CPU
    assert {n: p.stride() for n, p in built.model.named_parameters()} == before
    assert not any(hasattr(m, "_compiled_call_impl") and m._compiled_call_impl for m in built.model.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_channels_last_model_matches_eager_on_cuda():
    from vldm.train.build import apply_device_options

    cfg = tiny("train.compile=true", "train.channels_last=true", "model.temporal.merge_init=-1.0")
    eager, fast = build(cfg), build(cfg)
    for b in (eager, fast):
        b.model.to("cuda").eval()
    assert apply_device_options(fast.model, cfg, torch.device("cuda")) == ["channels_last", "compile"]
    x, ctx = torch.randn(1, 4, 4, 16, 16, device="cuda"), torch.randn(1, 3, 32, device="cuda")
    with torch.no_grad():
        assert torch.allclose(eager.model(x, 10, ctx), fast.model(x, 10, ctx), atol=1e-3)
