"""Typed config: defaults in dataclasses, YAML/`key=value` overrides, errors that name the key."""

from __future__ import annotations

import pytest

from vldm.config import Config, ConfigError, build_config, dump_yaml, from_dict, reference, to_dict


def test_defaults_and_overrides(tmp_path):
    y = tmp_path / "o.yaml"
    y.write_text("optim:\n  lr: 3.0e-4\nmodel:\n  temporal:\n    kernel_size: 5\n")
    cfg = build_config(
        Config,
        [str(y)],
        [
            "optim.lr=1e-4",
            "data.num_frames=16",
            "model.unet.block_out_channels=[64,128]",
            "model.temporal.scalar_conds=fps,noise_level",
            "train.ema_decay=0",
        ],
    )
    assert cfg.optim.lr == 1e-4 and cfg.model.temporal.kernel_size == 5 and cfg.data.num_frames == 16
    assert cfg.model.unet.block_out_channels == (64, 128)
    assert cfg.model.temporal.scalar_conds == ("fps", "noise_level")
    assert cfg.train.ema_decay == 0.0 and cfg.model.temporal.cross_attention is True


@pytest.mark.parametrize(
    "override,key",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("model.temporal.kernel_size=abc", "model.temporal.kernel_size"),
        ("model.temporal.kernel_size=4", "model.temporal.kernel_size"),
        ("model.temporal.gradient_checkpointing=sometimes", "model.temporal.gradient_checkpointing"),
        ("stage=audio", "stage"),
        ("data.batch_size=true", "data.batch_size"),
        ("nosuchsection.x=1", "nosuchsection"),
    ],
)
def test_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        build_config(Config, [], [override])
    assert key in str(e.value)


def test_unknown_yaml_key_suggests_the_right_one(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("optim:\n  learning_rate: 1.0\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        build_config(Config, [str(y)])
    y.write_text("optim:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        build_config(Config, [str(y)])


def test_resolved_config_round_trips(tmp_path):
    cfg = build_config(Config, [], ["model.temporal.num_class_labels=2", "optim.betas=[0.8,0.9]"])
    dump_yaml(cfg, tmp_path / "resolved.yaml")
    again = build_config(Config, [str(tmp_path / "resolved.yaml")])
    assert again == cfg and to_dict(again) == to_dict(cfg)
    assert from_dict(Config, to_dict(cfg)) == cfg


def test_every_field_is_documented():
    rows = reference(Config)
    assert len(rows) > 30
    undocumented = [key for key, _, _, help_ in rows if not help_]
    assert not undocumented, undocumented
