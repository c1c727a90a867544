"""Evaluation: metrics (FVD, FID, CLIPSIM, weight-free video metrics), the suite protocol and its hash,
and the pieces of the eval worker pool (`ray_jobs/eval_pool.py`). No Ray import in this package
outside `coordinator`'s executor protocol; W&B only inside `wandb_log`."""

from vldm.eval.frechet import FeatureStats, frechet_distance, frechet_from_stats

__all__ = ["FeatureStats", "frechet_distance", "frechet_from_stats"]
