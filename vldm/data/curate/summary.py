"""`python -m vldm.data.report OUTPUT`: what a sharding run did, for a person to look at.

Prints the counts of every stage (inputs -> shots -> clips cut -> filters -> buckets) with the reasons of what
was dropped, and writes a PNG (default OUTPUT/_report.png): the score histograms of `_stats.json` (motion with
the static / jitter thresholds, black bars, shot lengths) and a contact sheet per bucket (clips spread over its
shards, four frames each: first, two inner, last; labelled with the key and motion score).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vldm.data.codec import decode_all
from vldm.data.format import FAILED_FILE, INDEX_FILE, REJECTED_FILE, STATS_FILE
from vldm.data.tario import iter_samples

BG, FG, BAR, LINE = (255, 255, 255), (20, 20, 20), (70, 110, 180), (200, 40, 40)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def lines(stats: dict[str, Any], index: dict[str, Any]) -> list[str]:
    """The text report."""
    inp, cur, st = stats["inputs"], stats.get("curation", {}), stats.get("settings", {})
    out = [
        f"shards: {stats['shards']['complete']}/{stats['shards']['total']} complete"
        + (f" ({len(stats['shards']['incomplete'])} incomplete: rerun)" if stats["shards"]["incomplete"] else ""),
        f"1 inputs      : {inp['seen']} seen, {inp['duplicates']} duplicates, {inp['unique']} unique, "
        f"{inp['processed']} processed: {inp['ok']} ok, {inp['failed']} failed",
    ]
    out += [f"                failed {k}: {v}" for k, v in inp["failed_by_reason"].items()]
    det = cur.get("shot_detector", "none")
    extra = f" (threshold {st.get('cut_threshold')})" if det == "threshold" else ""
    extra = f" (probability > {st.get('shot_threshold')})" if det == "transnetv2" else extra
    shots = f", {cur.get('shots', 0)} shots" if det == "transnetv2" else ""
    out.append(f"2 shots       : detector {det}{extra}: {cur.get('cuts', 0)} cuts{shots}")
    out.append(
        f"3 clips cut   : {cur.get('clips_cut', stats['clips'])} (motion scored), "
        f"{cur.get('clips_rejected', 0)} rejected, {stats['clips']} kept"
    )
    thr = {"static": st.get("static_threshold"), "jitter": st.get("jitter_threshold")}
    out += [
        f"                rejected {k}: {v} (threshold {thr.get(k)})"
        for k, v in cur.get("rejected_by_reason", {}).items()
    ]
    if "buckets" in index:
        out.append(f"4 buckets     : {len(index['buckets'])}")
        for b, s in stats.get("buckets", {}).items():
            out.append(f"                {b}: {s['clips']} clips in {s['shards']} shards, {s['bytes'] / 1e6:.1f} MB")
    else:
        out.append(f"4 output      : {stats['clips']} clips, {stats['bytes'] / 1e6:.1f} MB (no buckets)")
    out.append(f"  {stats['seconds']:.0f} s of video; failed inputs: {FAILED_FILE}, rejected clips: {REJECTED_FILE}")
    return out


def _histogram(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    title: str,
    hist: dict,
    log_x: bool,
    marks: dict[str, float],
    font: Any,
    small: Any,
) -> None:
    x0, y0, x1, y1 = box
    draw.text((x0, y0), title, fill=FG, font=font)
    top, bottom, left, right = y0 + 24, y1 - 28, x0 + 34, x1 - 8
    draw.line([(left, bottom), (right, bottom)], fill=FG)
    draw.line([(left, top), (left, bottom)], fill=FG)
    counts, edges = hist.get("counts", []), hist.get("edges", [])
    if not counts:
        return
    peak = max(max(counts), 1)
    draw.text((x0, top - 2), str(peak), fill=FG, font=small)
    n = len(counts)
    width = (right - left) / n
    for i, c in enumerate(counts):
        if c:
            h = (bottom - top) * c / peak
            draw.rectangle([left + i * width + 1, bottom - h, left + (i + 1) * width - 1, bottom], fill=BAR)

    def pos(v: float) -> float:  # bin position of a value on the edges' scale
        e = np.asarray(edges, dtype=float)
        if log_x:
            e, v = np.log10(np.maximum(e, 1e-12)), math.log10(max(v, 1e-12))
        i = int(np.clip(np.searchsorted(e, v, side="right") - 1, 0, n - 1))
        frac = (v - e[i]) / (e[i + 1] - e[i]) if e[i + 1] > e[i] else 0.0
        return left + (i + min(max(frac, 0.0), 1.0)) * width

    for label, v in marks.items():
        if v:
            x = pos(v)
            draw.line([(x, top), (x, bottom)], fill=LINE, width=2)
            draw.text((x + 3, top), f"{label} {v:g}", fill=LINE, font=small)
    for i in (0, n // 2, n):
        e = edges[i]
        text = f"{e:.0e}" if log_x else (f"{e:g}" if e < 1e8 else "inf")
        draw.text((left + i * width - 10, bottom + 4), text, fill=FG, font=small)


def _pick_clips(out: Path, shards: list[dict[str, Any]], n: int) -> list[tuple[str, dict, np.ndarray]]:
    """About n clips spread over the shards: (key, json, frames)."""
    total = sum(s["samples"] for s in shards)
    if not total:
        return []
    wanted = {round(i * (total - 1) / max(n - 1, 1)) for i in range(min(n, total))}
    picked, base = [], 0
    for s in shards:
        local = {w - base for w in wanted if base <= w < base + s["samples"]}
        base += s["samples"]
        if not local:
            continue
        with open(out / s["name"], "rb") as f:
            for _, key, m in iter_samples(f, want=local.__contains__, stop=max(local) + 1):
                if m is not None:
                    picked.append((key, json.loads(m["json"]), decode_all(m["mp4"], format="mp4")))
    return picked


def _sheet(clips: list[tuple[str, dict, np.ndarray]], title: str, width: int, font: Any, small: Any) -> Image.Image:
    th = 90  # thumbnail height
    rows = []
    for key, meta, frames in clips:
        idx = sorted({0, len(frames) // 3, 2 * len(frames) // 3, len(frames) - 1})
        tiles = [Image.fromarray(frames[i]) for i in idx]
        tw = max(1, round(th * tiles[0].width / tiles[0].height))
        row = Image.new("RGB", (width, th + 18), BG)
        for j, t in enumerate(tiles):
            row.paste(t.resize((tw, th)), (j * (tw + 4), 16))
        motion = meta.get("scores", {}).get("motion")
        label = f"{key}  {Path(meta.get('source', '')).name}  {meta.get('start', 0):.2f}-{meta.get('end', 0):.2f} s"
        label += f"  shot {meta.get('shot', 0)}" + (f"  motion {motion:.4f}" if motion is not None else "")
        ImageDraw.Draw(row).text((2, 1), label, fill=FG, font=small)
        rows.append(row)
    img = Image.new("RGB", (width, 26 + sum(r.height for r in rows)), BG)
    ImageDraw.Draw(img).text((4, 4), title, fill=FG, font=font)
    y = 26
    for r in rows:
        img.paste(r, (0, y))
        y += r.height
    return img


def render(out: Path, stats: dict[str, Any], index: dict[str, Any], per_bucket: int = 6) -> Image.Image:
    font, small, width = _font(15), _font(11), 1200
    hists = stats.get("curation", {}).get("histograms", {})
    st = stats.get("settings", {})
    panels = Image.new("RGB", (width, 230), BG)
    d = ImageDraw.Draw(panels)
    third = width // 3
    cut = st.get("cut_threshold") if st.get("shot_detector", "threshold") == "threshold" else None
    _histogram(
        d,
        (0, 0, third, 230),
        "motion score per clip (log)",
        hists.get("motion", {}),
        True,
        {"static": st.get("static_threshold") or 0, "jitter": st.get("jitter_threshold") or 0, "cut": cut or 0},
        font,
        small,
    )
    _histogram(
        d,
        (third, 0, 2 * third, 230),
        "black bars (share of picture)",
        hists.get("borders", {}),
        False,
        {"max": st.get("border_max") if st.get("borders") == "crop" else 0},
        font,
        small,
    )
    _histogram(
        d,
        (2 * third, 0, width, 230),
        "shot length (s, TransNetV2)",
        hists.get("shot_seconds", {}),
        False,
        {},
        font,
        small,
    )
    text = Image.new("RGB", (width, 18 * (len(lines(stats, index)) + 1)), BG)
    td = ImageDraw.Draw(text)
    for i, line in enumerate(lines(stats, index)):
        td.text((6, 4 + 18 * i), line, fill=FG, font=small)
    parts = [text, panels]
    if "buckets" in index:
        groups = {b: [s for s in index["shards"] if s.get("bucket") == b] for b in index["buckets"]}
    else:
        groups = {"all clips": index["shards"]}
    for b, shards in groups.items():
        clips = _pick_clips(out, shards, per_bucket)
        title = f"bucket {b}: {sum(s['samples'] for s in shards)} clips" if "buckets" in index else b
        parts.append(_sheet(clips, title + ("" if clips else " (none)"), width, font, small))
    img = Image.new("RGB", (width, sum(p.height for p in parts)), BG)
    y = 0
    for p in parts:
        img.paste(p, (0, y))
        y += p.height
    return img


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vldm.data.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("output", metavar="OUTPUT", help="a sharder OUTPUT directory")
    ap.add_argument("--png", default="", help="where the picture goes (default OUTPUT/_report.png)")
    ap.add_argument("--clips-per-bucket", type=int, default=6, help="clips on each bucket's contact sheet")
    args = ap.parse_args(argv)
    out = Path(args.output)
    try:
        stats = json.loads((out / STATS_FILE).read_text())
        index = json.loads((out / INDEX_FILE).read_text())
    except (OSError, ValueError) as e:
        print(f"{out}: not a finished sharder output ({e})")
        return 2
    print("\n".join(lines(stats, index)))
    png = Path(args.png) if args.png else out / "_report.png"
    render(out, stats, index, args.clips_per_bucket).save(png)
    print(f"picture: {png}")
    return 0
