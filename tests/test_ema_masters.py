"""The EMA follows the fp32 master weights, sharded over the ZeRO partitions (issue 16, item 3).

Real DeepSpeed (0.19.8 runs bf16 on CPU) on 2 ranks over gloo, through the project's `parallelize` and
EMA (tests/ema_ranks.py is one rank). Each check compares the EMA assembled from the ranks' partitions with
an fp32 reference EMA of the full masters (DeepSpeed's `safe_get_full_fp32_param`): equal to the bit.
The reference EMA of the bf16 module weights differs from it (updates of ~1e-4 are below bf16's resolution),
which is the error that updating from the masters removes.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
from train_helpers import spawn_ranks, train_env

STEPS = 6


def run_ranks(out, nproc: int, stage: int, precision: str, steps: int = STEPS, resume=None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    argv = ["tests/ema_ranks.py", str(out), str(stage), precision, str(steps), *([str(resume)] if resume else [])]
    procs = spawn_ranks(argv, nproc, train_env(out), out)
    try:
        codes = [p.wait(timeout=300) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise
    logs = "\n".join((out / f"rank{r}.log").read_text()[-3000:] for r in range(nproc))
    assert codes == [0] * nproc, logs
    return torch.load(out / "result.pt")


def assert_equal_dicts(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max().item())


@pytest.fixture(scope="module")
def zero2_bf16(tmp_path_factory):
    out = tmp_path_factory.mktemp("ema") / "zero2_bf16"
    return out, run_ranks(out, 2, 2, "bf16")


@pytest.mark.parametrize(
    "stage, optimizer, sharded",
    [(0, "FP16_UnfusedOptimizer", False), (1, "BF16_Optimizer", True), (2, "DeepSpeedZeroOptimizer", True)],
)
def test_bf16_ema_is_the_ema_of_the_fp32_masters(stage, optimizer, sharded, tmp_path, zero2_bf16):
    r = zero2_bf16[1] if stage == 2 else run_ranks(tmp_path / f"zero{stage}", 2, stage, "bf16")
    assert r["param_dtype"] == "torch.bfloat16" and r["optimizer"] == optimizer and r["num_updates"] == STEPS
    assert_equal_dicts(r["ema"], r["ref"])
    # the EMA of the bf16 weights is not it: the difference is many fp32 roundings, not noise
    gap = max((r["ref"][k] - r["ref_bf16"][k]).abs().max().item() for k in r["ref"])
    assert gap > 1e-5, gap
    # each rank keeps only its partition's EMA (about 1/world of it: partitions are padded to alignment)
    assert r["sharded"] is sharded
    assert (r["local_numel"] < 0.6 * r["full_numel"]) if sharded else r["local_numel"] == r["full_numel"]
    if stage:  # ZeRO 1/2 accumulate the 2 micro-batches per step in fp32 (grad_accum_dtype)
        assert r["accum_dtype"] == "torch.float32"


def test_fp32_ema_is_unchanged_full_and_of_the_parameters(tmp_path):
    # fp32 parameters are their own masters: the EMA is the one of before (full, from the parameters)
    r = run_ranks(tmp_path / "zero2_fp32", 2, 2, "fp32")
    assert r["param_dtype"] == "torch.float32" and not r["sharded"] and r["local_numel"] == r["full_numel"]
    assert_equal_dicts(r["ema"], r["ref"])
    assert_equal_dicts(r["ref"], r["ref_bf16"])  # "bf16" reference = of the module's weights: the same here


def test_sharded_ema_resumes_exactly_at_the_same_and_another_world_size(tmp_path, zero2_bf16):
    saved_dir, saved = zero2_bf16
    # 2 ranks again: loaded into the same partitions and assembled back, bit for bit
    same = run_ranks(tmp_path / "resume2", 2, 2, "bf16", steps=0, resume=saved_dir / "result.pt")
    assert_equal_dicts(same["ema"], saved["ema"])
    # 1 rank (another partitioning: all of it), continued for 3 steps: the reference EMA of this run's
    # masters started from the saved EMA, so loading lost nothing
    one = run_ranks(tmp_path / "resume1", 1, 2, "bf16", steps=3, resume=saved_dir / "result.pt")
    assert one["num_updates"] == STEPS + 3
    assert_equal_dicts(one["ema"], one["ref"])
    assert any(not torch.equal(one["ema"][k], saved["ema"][k]) for k in saved["ema"])  # it did move on
