#!/usr/bin/env python
"""Cut a video corpus into clips and write WebDataset shards, on a Ray cluster.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python data_prep/shard_videos.py $PWD/data/videos $PWD/data/shards --frames 16 --fps 8 --size 256

or on one machine (attaches to a running local Ray, else starts a private one):

    python data_prep/shard_videos.py data/videos data/shards --workers 2

OUTPUT gets {prefix}-{shard:06d}.tar (+ .manifest.jsonl, .done.json), _stats.json and failed.jsonl.
Rerunning the same command finishes an interrupted run (complete shards are skipped, every clip is
written exactly once); failed.jsonl is a valid INPUT for a retry run. Exit status: 0 when every shard
is complete, 1 when some are not (rerun), 2 on bad arguments.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vldm.config.cli import parse  # noqa: E402
from vldm.config.data import ShardConfig  # noqa: E402
from vldm.data.pipeline import run, setup_logging  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg = parse(ShardConfig, argv, prog="shard_videos.py", description=__doc__)
    setup_logging()
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
