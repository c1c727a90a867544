"""Host RSS of every rank around a checkpoint save, with the consolidated fp32 weights materialised on
rank 0 only (now) or on every rank (before issue 11's fix, `--every-rank`). A measurement, not a benchmark
of speed: each rank samples its own RSS every 5 ms during the save and prints the peak above the RSS
just before it.

    bash -c 'for r in 0 1; do RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29611 \\
        DS_ACCELERATOR=cpu python bench/save_rss.py [--every-rank] & done; wait'
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time

import psutil

from vldm.config import Config, build_config
from vldm.train import checkpointing
from vldm.train.trainer import train

EVERY_RANK = "--every-rank" in sys.argv
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = f"/tmp/vldm_save_rss_{'every' if EVERY_RANK else 'rank0'}"

if EVERY_RANK:
    _orig = checkpointing.full_fp32_weights
    checkpointing.full_fp32_weights = lambda built, keep=True: _orig(built, True)

_save = checkpointing.Checkpointer.save


def measured_save(self, *a, **k):
    proc, peak, stop = psutil.Process(), [0], threading.Event()
    # give the heap freed by the training step back to the OS first: else the save's new tensors reuse it
    # and never show in the RSS
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = proc.memory_info().rss

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        return _save(self, *a, **k)
    finally:
        stop.set()
        t.join()
        print(
            f"RSS rank {self.world.rank} ({'every rank' if EVERY_RANK else 'rank 0 only'} materialises): "
            f"{before / 2**20:.0f} MiB before the save, peak +{(peak[0] - before) / 2**20:.0f} MiB during it",
            flush=True,
        )


checkpointing.Checkpointer.save = measured_save
# a wider toy UNet (~40M trainable temporal parameters: 160 MB in fp32) in bf16, so the fp32 copy is a real copy
cfg = build_config(
    Config,
    [os.path.join(ROOT, "configs", "tiny_cpu.yaml")],
    [
        f"run_dir={RUN}",
        "checkpoint.resume=never",
        "model.unet.block_out_channels=[256,512]",
        "model.unet.norm_num_groups=32",
        "deepspeed.precision=bf16",
        "train.max_steps=1",
        "train.count_flops=false",
        "data.batch_size=1",
        "wandb.mode=disabled",
        "checkpoint.save_optimizer=false",
    ],
)
sys.exit(train(cfg))
