"""The video decoder: the image decoder exactly at initialisation; GAN fine-tuning trains only it."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from paper_helpers import changed, snapshot

from vldm.config.core import ConfigError, build_config
from vldm.diffusion import decode_latents
from vldm.models.base import build_tiny_base
from vldm.models.discriminator3d import PatchDiscriminator3D, hinge_d_loss
from vldm.models.lpips import LPIPS, load_lpips, save_lpips
from vldm.models.temporal_decoder import VideoDecoder
from vldm.sample.tiny import perturb


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_base(tmp_path_factory.mktemp("decoder") / "base", with_text=False)


@torch.no_grad()
def test_decoder_is_the_image_decoder_at_initialisation(base):
    vae = AutoencoderKL.from_pretrained(str(base / "vae")).eval()
    dec = VideoDecoder.from_vae(vae).eval()
    z = torch.randn(2, 4, 5, 4, 4)
    assert torch.equal(dec.decode(z), decode_latents(vae, z))  # bit for bit
    assert torch.equal(dec.decode(z, window=3, overlap=1), decode_latents(vae, z))  # windows too
    perturb(dec.temporal)  # trained temporal layers mix frames; image mode still is the image decoder
    assert not torch.allclose(dec.decode(z), decode_latents(vae, z))
    assert torch.equal(dec.decode(z, image_only=True), decode_latents(vae, z))


def test_lpips_loads_from_a_local_file_with_its_sha256(tmp_path):
    torch.manual_seed(0)
    net = LPIPS((4, 8, 8, 8, 8))
    sha = save_lpips(net, tmp_path / "lpips.safetensors")
    loaded = load_lpips(tmp_path / "lpips.safetensors", sha)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded(x, y), net(x, y)) and (net(x, x) == 0).all() and (net(x, y) > 0).all()
    with pytest.raises(ValueError, match="sha256"):
        load_lpips(tmp_path / "lpips.safetensors", "0" * 64)
    with pytest.raises(FileNotFoundError):
        load_lpips(tmp_path / "missing.safetensors")


def test_discriminator_is_patchwise_over_space_and_time():
    d = PatchDiscriminator3D(3, 8, 3)
    logits = d(torch.randn(2, 3, 8, 32, 32))
    assert logits.shape[:2] == (2, 1) and logits[0, 0].numel() > 1
    assert d(torch.randn(1, 3, 3, 32, 32)).shape[2] >= 1  # short clips are padded in time
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0


def test_decoder_fine_tuning_trains_only_the_decoder_and_resumes(base, tmp_path):
    from vldm.config import Config
    from vldm.sample.runs import load_decoder
    from vldm.train.decoder import DecoderTrainer

    torch.manual_seed(0)
    sha = save_lpips(LPIPS((4, 8, 8, 8, 8)), tmp_path / "lpips.safetensors")
    args = [
        "stage=decoder",
        f"model.pretrained={base}",
        f"run_dir={tmp_path / 'run'}",
        "wandb.mode=disabled",
        "train.max_steps=2",
        f"decoder.lpips_weights={tmp_path / 'lpips.safetensors'}",
        f"decoder.lpips_sha256={sha}",
        "decoder.disc_channels=8",
        "data.num_frames=4",
        "data.size=16",
        "data.batch_size=1",
        "checkpoint.every=1",
        "optim.lr=1e-3",
    ]
    cfg = build_config(Config, [], args)
    trainer = DecoderTrainer(cfg)
    vae_before, spatial_before = snapshot(trainer.vae), snapshot(trainer.model.decoder)
    temporal_before = snapshot(trainer.model.temporal)
    ck = trainer.run()
    assert ck.name == "step_00000002"
    assert not changed(vae_before, trainer.vae)  # encoder (and the image VAE) untouched
    assert not changed(spatial_before, trainer.model.decoder)  # decoder.trainable=temporal
    assert changed(temporal_before, trainer.model.temporal)
    loaded = load_decoder(tmp_path / "run")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trainer.model.state_dict().values()))
    # resume=auto continues from step 2
    again = DecoderTrainer(build_config(Config, [], args[:-1] + ["train.max_steps=3"]))
    assert again.step == 2
    with pytest.raises(ConfigError, match="lpips_weights"):
        build_config(Config, [], ["stage=decoder", "decoder.lpips_weight=1.0"])
    build_config(Config, [], ["decoder.lpips_weight=1.0"])  # other stages never read the section


def test_official_lpips_weights_convert_by_their_names():
    """torchvision vgg16 keys (features.N.*, classifier ignored) + lpips lin{k}.model.1.weight -> one model."""
    from vldm.models.lpips import VGG16_CHANNELS, convert_official

    ref = LPIPS(VGG16_CHANNELS)
    vgg = {k: torch.randn_like(v) for k, v in ref.state_dict().items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = torch.zeros(1)
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(VGG16_CHANNELS)}
    model = convert_official(vgg, lins)
    assert torch.equal(model.features[28].weight, vgg["features.28.weight"])  # conv5_3
    assert torch.equal(model.lins[4].weight, lins["lin4.model.1.weight"])
