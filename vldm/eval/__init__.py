"""Evaluation: metrics (FVD, FID, CLIPSIM, weight-free video metrics), the suite protocol and its hash,
and the Ray-free parts of the eval worker pool (`ray_jobs/eval_pool.py` adds the Ray actors).

Modules: frechet (Frechet distance, mergeable statistics), extractors + i3d (feature networks from local
files), video_metrics (weight-free), videoio (mp4 in/out), suite (protocol, hash, seeds), tasks (shards
and partial files), worker (computes a shard), results (merging, result.json), coordinator (what runs
when, retries), layout (paths, lock), wandb_log / wandb_reader (W&B out / offline file in), report (CLI).
"""

from vldm.eval.frechet import FeatureStats, frechet_distance, frechet_from_stats

__all__ = ["FeatureStats", "frechet_distance", "frechet_from_stats"]
