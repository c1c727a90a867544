#!/usr/bin/env python
"""Write the synthetic moving-shapes corpus: OUTPUT/{prefix}_{index:05d}.mp4 + .json (caption, trajectory).

    python data_prep/make_synthetic.py data/synthetic --count 200 --size 64 --frames 32 --fps 8

Deterministic: the same seed and options give the same files, byte for byte.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vldm.config.cli import parse  # noqa: E402
from vldm.config.data import SyntheticConfig  # noqa: E402
from vldm.data.synthetic import write_corpus  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg = parse(SyntheticConfig, argv, prog="make_synthetic.py", description=__doc__)
    t = time.time()
    paths = write_corpus(cfg, log_every=50)
    print(f"[make_synthetic] wrote {len(paths)} videos to {cfg.output} in {time.time() - t:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
