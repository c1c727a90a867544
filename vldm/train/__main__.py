"""Train a Video LDM: `python -m vldm.train --config configs/X.yaml [key=value ...]`.

One process per GPU (or 2 CPU processes), started by slurm/train_temporal.sbatch (under SLURM or with
bash), torchrun or the deepspeed launcher; the rank comes from their environment. `--check` validates
the config (types, paths, cross-field rules) and exits without starting anything: a bad config fails
here, naming the key. Exit codes: 0 done, 2 bad config, 3 aborted (non-finite steps), 75 stopped on a
signal after a checkpoint (requeue me), 1 error.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m vldm.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config reference: python -m vldm.config --reference",
    )
    ap.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="YAML",
        help="config file (overrides only; repeat to layer several)",
    )
    ap.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. run_dir=outputs/x train.max_steps=100 optim.lr=1e-4"
    )
    ap.add_argument("--check", action="store_true", help="validate the config, print it resolved, and exit")
    ap.add_argument(
        "--print", dest="print_key", metavar="KEY", help="validate, print one resolved value (e.g. run_dir), and exit"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if not (a.check or a.print_key):
        from vldm.train.signals import install_early

        install_early()  # a preemption during the imports below must not kill the rank
    from vldm.config import Config, ConfigError, build_config, dump_yaml
    from vldm.train.preflight import check
    from vldm.train.signals import CONFIG_EXIT

    yamls = list(a.config) + [x for x in a.overrides if "=" not in x]  # a bare path is a config file too
    overrides = [x for x in a.overrides if "=" in x]
    try:
        cfg = build_config(Config, yamls, overrides)
        warnings = check(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return CONFIG_EXIT
    rank = int(
        os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))
        if "SLURM_STEP_ID" in os.environ or "RANK" in os.environ
        else 0
    )
    for w in warnings:
        if rank == 0:
            print(f"config warning: {w}", file=sys.stderr)
    if a.print_key:
        from vldm.config.core import to_dict

        value = to_dict(cfg)
        for part in a.print_key.split("."):
            if not isinstance(value, dict) or part not in value:
                print(f"config error: unknown key {a.print_key!r}", file=sys.stderr)
                return CONFIG_EXIT
            value = value[part]
        print(value)
        return 0
    if a.check:
        print(dump_yaml(cfg), end="")
        print(f"# config OK: stage={cfg.stage} task={cfg.task} run_dir={cfg.run_dir}", file=sys.stderr)
        return 0
    import torch

    if not torch.cuda.is_available():
        # before deepspeed is imported: its accelerator is chosen at import
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if cfg.stage == "decoder":
        # the video decoder (paper §3.1.1): a two-optimizer GAN loop with DDP, same launcher and run layout
        from vldm.train.decoder import run_decoder

        return run_decoder(cfg)
    from vldm.train.trainer import train

    return train(cfg)


if __name__ == "__main__":
    sys.exit(main())
