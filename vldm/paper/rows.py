"""The rows of `make paper`'s table: each claim, its numbers, and `shown` computed from those numbers.

A row is built from measured values only (vldm.paper.metrics on decoded videos). `shown` is a pure
function of the values (the functions below), so the JSON, the table and the picture cannot disagree,
and a row that was not built says so (`shown: false` with a `note`) instead of carrying a number.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from vldm.io import atomic_write_bytes, atomic_write_text

# the rows of issue 13, in the order of its table (summary.json keeps this order)
ROWS = (
    "keyframes",
    "prediction",
    "rollout",
    "interpolation",
    "decoder",
    "upsampler",
    "personalisation",
    "ablation",
    "cascade",
)
CLAIMS = {
    "keyframes": "video model keeps the shape's colour and area far better than image mode (colour drift <= 0.25x)",
    "prediction": "trajectory error with context frames (S=1,2) << without (S=0); context guidance's effect",
    "rollout": "autoregressive prediction to >= 4x the training length: no window degrades > 20% vs the first",
    "interpolation": "T -> 4T in-between centroids: error below nearest-key-frame repeat and linear cross-fade",
    "decoder": "video decoder flickers clearly less than the image decoder at no real PSNR loss (FVD 390.88 -> 32.94)",
    "upsampler": "video upsampler more consistent over time than the same model in image mode (FVD 165.98 -> 45.39)",
    "personalisation": "temporal layers of model A on fine-tuned B: B's concept appears, accel <= 0.5x B's image mode",
    "ablation": "full temporal layers beat attention-only at equal steps (FVD 704 vs 534)",
    "cascade": "key frames -> interpolation -> decoder -> upsampler: motion and identity near real clips",
}


@dataclass
class Row:
    name: str
    claim: str
    metrics: dict = field(default_factory=dict)  # the model's figures
    baselines: dict = field(default_factory=dict)  # what it is compared with (image mode, real clips, ...)
    shown: bool = False
    note: str = ""
    samples: list[str] = field(default_factory=list)  # the mp4s the row measured
    picture: str | None = None
    seconds: float | None = None  # wall time of the row (training included)
    cpu_seconds: float | None = None  # CPU time of the row and the processes it ran

    def as_dict(self) -> dict:
        return _rounded(asdict(self))


def _rounded(x):
    if isinstance(x, float):
        return None if not math.isfinite(x) else round(x, 5)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def not_built(name: str, why: str) -> Row:
    return Row(name, CLAIMS[name], shown=False, note=why)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def keyframes_row(image: dict, video: dict, real: dict, target: float = 0.25) -> Row:
    """image / video / real: {"identity": identity_summary(...), "motion": motion_summary(...)}.

    Shown when the video model's median colour drift is <= `target` x image mode's (the issue's aim)
    and its motion (acceleration) is closer to the real clips' than image mode's."""
    ratio = _ratio(video["identity"]["colour_drift"], image["identity"]["colour_drift"])
    area_ratio = _ratio(video["identity"]["area_drift"], image["identity"]["area_drift"])
    acc = [m["motion"]["accel"] for m in (image, video, real)]
    motion_closer = None not in acc and abs(acc[1] - acc[2]) < abs(acc[0] - acc[2])
    shown = ratio is not None and ratio <= target and motion_closer
    row = Row(
        "keyframes",
        CLAIMS["keyframes"],
        metrics={**video, "colour_drift_ratio": ratio, "area_drift_ratio": area_ratio},
        baselines={"image_mode": image, "real_clips": real},
        shown=bool(shown),
    )
    if not shown:
        why = []
        if ratio is None or ratio > target:
            why.append(f"colour drift ratio {ratio if ratio is None else round(ratio, 3)} > target {target}")
        if not motion_closer:
            why.append("motion not closer to the real clips than image mode")
        row.note = "; ".join(why)
    return row


def prediction_row(by_s: dict, by_guidance: dict, real: dict, much: float = 0.5) -> Row:
    """by_s: S -> {"trajectory_error", "identity", "motion"} on the same generated frames; by_guidance:
    context guidance scale -> the same for S = 2. Shown when the error with context (S = 1 and 2) is at
    most `much` x the error without (S = 0)."""
    e0 = by_s[0]["trajectory_error"]
    ratios = {s: _ratio(by_s[s]["trajectory_error"], e0) for s in (1, 2)}
    shown = all(r is not None and r <= much for r in ratios.values())
    row = Row(
        "prediction",
        CLAIMS["prediction"],
        metrics={
            "by_context_frames": {f"S={s}": v for s, v in by_s.items()},
            "error_ratio_vs_S0": {f"S={s}": r for s, r in ratios.items()},
            "by_context_guidance_S2": {str(k): v for k, v in by_guidance.items()},
        },
        baselines={"S=0 (no context)": by_s[0], "real_clips": real},
        shown=bool(shown),
    )
    if not shown:
        row.note = f"error ratio vs S=0: {', '.join(f'S={s} {fmt(r)}' for s, r in ratios.items())} (need <= {much})"
    return row


ROLLOUT_METRICS = ("accel", "colour_drift", "area_drift")


COHERENT_ACCEL = 0.1  # frame units: the demo's video model measures 0.065, frames drawn independently ~0.3-0.6


def rollout_row(windows: list[dict], real: dict, max_degrade: float = 0.2, coherent: float = COHERENT_ACCEL) -> Row:
    """windows: per window of the rollout {"accel", "colour_drift", "area_drift", ...}; real: the same of
    real clips. Shown when no window's motion or identity figure exceeds the first window's by more than
    `max_degrade` (relative). The first window's figure is floored at the real clips' own: the relative
    change of a figure at the level of codec noise is noise, not degradation. And the first window must
    be coherent motion (acceleration <= `coherent`): a rollout that is incoherent from its first window
    cannot degrade, which shows nothing."""
    first = windows[0]
    worst = {}
    for k in ROLLOUT_METRICS:
        base = max(first[k] or 0.0, real.get(k) or 0.0)
        vals = [w[k] for w in windows[1:] if w[k] is not None]
        worst[k] = max([(v - base) / base for v in vals], default=0.0) if base > 0 else None
    first_ok = first["accel"] is not None and first["accel"] <= coherent
    shown = first_ok and len(windows) >= 4 and all(v is not None and v <= max_degrade for v in worst.values())
    row = Row(
        "rollout",
        CLAIMS["rollout"],
        metrics={"windows": windows, "worst_degradation_vs_first": worst},
        baselines={"real_clips": real},
        shown=bool(shown),
    )
    if not shown:
        bad = {k: v for k, v in worst.items() if v is None or v > max_degrade}
        why = []
        if len(windows) < 4:
            why.append(f"{len(windows)} windows (need >= 4)")
        if not first_ok:
            why.append(f"first window not coherent: accel {fmt(first['accel'])} (need <= {coherent})")
        if bad:
            why.append(
                "worst window vs the first: "
                + ", ".join(f"{k} {fmt(v)}" for k, v in bad.items())
                + f" (need <= {max_degrade})"
            )
        row.note = "; ".join(why)
    return row


def interpolation_row(model: dict, repeat: dict, fade: dict, below_repeat: float = 0.75) -> Row:
    """model / repeat (nearest key frame) / fade (linear cross-fade): {"trajectory_error", "mask_iou", ...}
    of the in-between frames. Shown when the model's centroid error is <= `below_repeat` x the repeat's and
    its shape error (1 - mask IoU) is below the cross-fade's. The cross-fade is compared on the shape, not
    the centroid: the mean position of its two half-shapes is the linear interpolation of the key frames'
    positions, exact for constant motion, so a centroid cannot see what is wrong with it (two ghosts)."""
    e, er = model["trajectory_error"], repeat["trajectory_error"]
    s, sf = 1 - model["mask_iou"], 1 - fade["mask_iou"]
    shown = e <= below_repeat * er and s < sf
    row = Row(
        "interpolation",
        CLAIMS["interpolation"],
        metrics=dict(model),
        baselines={"nearest_key_frame": repeat, "cross_fade": fade},
        shown=bool(shown),
    )
    if not shown:
        why = []
        if not e <= below_repeat * er:
            why.append(f"centroid error {fmt(e)} vs nearest key frame {fmt(er)} (need <= {below_repeat}x)")
        if not s < sf:
            why.append(f"shape error 1 - IoU {fmt(s)} vs cross-fade {fmt(sf)} (need below)")
        row.note = "; ".join(why)
    return row


def ablation_row(attention_only: dict, full: dict, real: dict, margin: float = 0.9) -> Row:
    """attention_only / full / real: {"identity", "motion"} as in keyframes_row, full = the demo's video
    model, both trained for the same steps. Shown when full is clearly closer to the real clips in motion
    (|accel - real accel| at most `margin` x attention-only's: a difference of a few percent on 16
    videos is noise) and keeps colour at least as well."""
    pairs = (("attention_only", attention_only), ("full", full))
    if any(v["motion"]["accel"] is None for _, v in pairs) or real["motion"]["accel"] is None:
        return Row("ablation", CLAIMS["ablation"], shown=False, note="no measurable motion (no shape in 3 frames)")
    gap = {k: abs(v["motion"]["accel"] - real["motion"]["accel"]) for k, v in pairs}
    col = {k: v["identity"]["colour_drift"] for k, v in pairs}
    shown = (
        gap["full"] <= margin * gap["attention_only"]
        and None not in col.values()
        and col["full"] <= col["attention_only"]
    )
    row = Row(
        "ablation",
        CLAIMS["ablation"],
        metrics={**full, "accel_gap_to_real": gap["full"]},
        baselines={
            "attention_only": {**attention_only, "accel_gap_to_real": gap["attention_only"]},
            "real_clips": real,
        },
        shown=bool(shown),
    )
    if not shown:
        row.note = (
            f"accel gap to real: full {fmt(gap['full'])} vs attention-only {fmt(gap['attention_only'])};"
            f" colour drift full {fmt(col['full'])} vs {fmt(col['attention_only'])}"
        )
    return row


def decoder_row(image: dict, video: dict, max_psnr_loss: float = 0.5, min_gain: float = 0.1) -> Row:
    """image / video: {"psnr", "tde", "flicker"} of the image decoder and the fine-tuned video decoder on
    the same latents of held-out clips. Shown when the video decoder's temporal-difference error is at
    least `min_gain` (relative) lower at a PSNR at most `max_psnr_loss` dB below the image decoder's."""
    gain = 1 - video["tde"] / image["tde"] if image["tde"] > 0 else 0.0
    psnr_loss = image["psnr"] - video["psnr"]
    shown = gain >= min_gain and psnr_loss <= max_psnr_loss
    row = Row(
        "decoder",
        CLAIMS["decoder"],
        metrics={**video, "tde_reduction": gain, "psnr_loss_db": psnr_loss},
        baselines={"image_decoder": image},
        shown=bool(shown),
    )
    if not shown:
        row.note = (
            f"temporal-difference error {gain:.1%} lower (need >= {min_gain:.0%}) at {psnr_loss:+.2f} dB PSNR loss"
            f" (allowed <= {max_psnr_loss} dB)"
        )
    return row


def upsampler_row(image: dict, video: dict, bicubic: dict, max_psnr_loss: float = 0.5, min_gain: float = 0.1) -> Row:
    """image / video / bicubic: {"psnr", "tde", "flicker"} of the x4 upsampler in image mode (temporal layers
    off), the same model in video mode and bicubic upsampling, on the same 4x-downsampled held-out clips vs the
    true high-res clips. Shown when video mode's temporal-difference error is at least `min_gain` (relative)
    lower than image mode's at a PSNR at most `max_psnr_loss` dB below it (bicubic is the floor, not a bar)."""
    gain = 1 - video["tde"] / image["tde"] if image["tde"] > 0 else 0.0
    psnr_loss = image["psnr"] - video["psnr"]
    shown = gain >= min_gain and psnr_loss <= max_psnr_loss
    row = Row(
        "upsampler",
        CLAIMS["upsampler"],
        metrics={**video, "tde_reduction": gain, "psnr_loss_db": psnr_loss},
        baselines={"image_mode": image, "bicubic": bicubic},
        shown=bool(shown),
    )
    if not shown:
        row.note = (
            f"temporal-difference error {gain:.1%} lower than image mode (need >= {min_gain:.0%}) at"
            f" {psnr_loss:+.2f} dB PSNR loss (allowed <= {max_psnr_loss} dB)"
        )
    return row


def personalisation_row(
    a_video: dict, b_image: dict, b_video: dict, min_fraction: float = 0.5, min_lift: float = 0.25, accel: float = 0.5
) -> Row:
    """a_video: image model A + its temporal layers; b_image: B (A fine-tuned on a concept A never saw) in image
    mode; b_video: B + A's temporal layers; each {"concept_fraction", "identity", "motion"} on prompts naming the
    concept. Shown when the concept appears (B + temporal draws it in >= `min_fraction` of the frames and in
    `min_lift` more of them than A + temporal) and motion holds (B + temporal's acceleration <= `accel` x B's
    image mode's, the issue's bar)."""
    fb, fa = b_video["concept_fraction"], a_video["concept_fraction"]
    acc_v, acc_i = b_video["motion"]["accel"], b_image["motion"]["accel"]
    ratio = _ratio(acc_v, acc_i)
    concept = fb >= min_fraction and fb - fa >= min_lift
    motion = ratio is not None and ratio <= accel
    row = Row(
        "personalisation",
        CLAIMS["personalisation"],
        metrics={**b_video, "accel_ratio_vs_image_mode": ratio},
        baselines={"A_plus_temporal": a_video, "B_image_mode": b_image},
        shown=bool(concept and motion),
    )
    why = []
    if not concept:
        why.append(f"concept in {fmt(fb)} of B+temporal's frames vs A+temporal {fmt(fa)}")
        why[-1] += f" (need >= {min_fraction} and {min_lift} more)"
    if not motion:
        why.append(f"accel ratio vs B's image mode {fmt(ratio)} (need <= {accel})")
    row.note = "; ".join(why)
    return row


# below these a figure is at the level of the real clips (codec noise, the metrics' own tolerances)
NEAR_REAL = {"accel": 0.01, "colour_drift": 0.03, "area_drift": 0.05}


def cascade_row(cascade: dict, image_keys: dict, real: dict, margin: float = 0.5) -> Row:
    """cascade / image_keys / real: {"identity", "motion"} of the whole cascade's final videos, of the same
    cascade fed image-mode key frames (drawn independently), and of real clips at the final resolution and
    length, each also with "shape_area" (median fraction of the frame the shape covers). Shown when the shape's
    area is 0.5-2x the real clips' (a shape is drawn at all) and, for acceleration and colour and area drift,
    the cascade's distance to the real clips is at most `margin` x the image-key-frame cascade's, or within
    NEAR_REAL of the real clips."""

    def figures(m: dict) -> dict:
        return {"accel": m["motion"]["accel"], **{k: m["identity"][k] for k in ("colour_drift", "area_drift")}}

    c, b, r = figures(cascade), figures(image_keys), figures(real)
    gaps, ok = {}, {}
    # a shape at all: noise (an untrained upsampler) segments as one frame-sized "shape" that never moves or
    # changes, which every figure below would call near the real clips
    area = _ratio(cascade.get("shape_area"), real.get("shape_area"))
    ok["shape_area"] = area is not None and 0.5 <= area <= 2.0
    for k in NEAR_REAL:
        if None in (c[k], b[k], r[k]):
            gaps[k], ok[k] = None, False
            continue
        gc, gb = abs(c[k] - r[k]), abs(b[k] - r[k])
        gaps[k] = {"cascade": gc, "image_key_frames": gb}
        ok[k] = gc <= NEAR_REAL[k] or gc <= margin * gb
    row = Row(
        "cascade",
        CLAIMS["cascade"],
        metrics={**cascade, "gap_to_real": gaps},
        baselines={"image_key_frames": image_keys, "real_clips": real},
        shown=all(ok.values()),
    )
    row.metrics["shape_area_ratio_vs_real"] = area
    bad = [k for k, v in ok.items() if not v and k != "shape_area"]
    if not ok["shape_area"]:
        row.note = f"shape area {fmt(area)}x the real clips' (need 0.5-2: no shape drawn); "
    if bad:
        row.note += (
            "not near the real clips: "
            + ", ".join(
                f"{k} gap {fmt(gaps[k]['cascade']) if gaps[k] else 'n/a'}"
                f" vs image key frames {fmt(gaps[k]['image_key_frames']) if gaps[k] else 'n/a'}"
                for k in bad
            )
            + f" (need <= {margin}x or within {', '.join(f'{k} {NEAR_REAL[k]}' for k in bad)})"
        )
    return row


# ---------------------------------------------------------------------------------------------- pictures
def bars_png(path: str | Path, title: str, groups: dict[str, dict[str, float | None]], width: int = 520) -> Path:
    """A bar chart without matplotlib: one block per metric (`groups`: metric -> {source: value}), each
    block scaled to its own maximum, value printed on every bar."""
    colours = [(120, 160, 230), (230, 140, 90), (120, 200, 120), (200, 120, 200), (200, 200, 110)]
    bar_h, gap, left = 14, 8, 150
    n = sum(len(v) for v in groups.values())
    height = 22 + n * (bar_h + 3) + len(groups) * (gap + 14)
    img = Image.new("RGB", (width, height), (250, 250, 250))
    d = ImageDraw.Draw(img)
    d.text((4, 4), title, fill=(0, 0, 0))
    y = 22
    for metric, values in groups.items():
        d.text((4, y), metric, fill=(0, 0, 0))
        y += 14
        top = max([abs(v) for v in values.values() if v is not None and math.isfinite(v)] or [1.0]) or 1.0
        for k, (src, v) in enumerate(values.items()):
            d.text((10, y + 2), src[:22], fill=(40, 40, 40))
            if v is not None and math.isfinite(v):
                w = int((width - left - 70) * abs(v) / top)
                d.rectangle([left, y, left + max(w, 1), y + bar_h], fill=colours[k % len(colours)])
                d.text((left + w + 4, y + 2), f"{v:.4g}", fill=(0, 0, 0))
            else:
                d.text((left, y + 2), "n/a", fill=(0, 0, 0))
            y += bar_h + 3
        y += gap
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    atomic_write_bytes(path, buf.getvalue())
    os.chmod(path, 0o644)  # the atomic write's temp file is private (0600); a picture is for everyone
    return Path(path)


# ---------------------------------------------------------------------------------------------- outputs
def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def headline(row: Row) -> str:
    """The row's key figures in one cell of the printed table."""
    m, b = row.metrics, row.baselines
    if row.name == "keyframes" and m:
        img = b["image_mode"]
        return (
            f"colour drift {fmt(m['identity']['colour_drift'])} vs image {fmt(img['identity']['colour_drift'])}"
            f" (x{fmt(m['colour_drift_ratio'])}), real {fmt(b['real_clips']['identity']['colour_drift'])};"
            f" accel {fmt(m['motion']['accel'])} vs {fmt(b['image_mode']['motion']['accel'])}"
        )
    if row.name == "prediction" and m:
        e = {k: v["trajectory_error"] for k, v in m["by_context_frames"].items()}
        g = {k: v["trajectory_error"] for k, v in m["by_context_guidance_S2"].items()}
        return (
            "traj err "
            + ", ".join(f"{k} {fmt(v)}" for k, v in e.items())
            + "; S=2 by guidance "
            + ", ".join(f"{k}: {fmt(v)}" for k, v in g.items())
        )
    if row.name == "rollout" and m:
        w = m["windows"]
        return (
            f"{len(w)} windows; accel {fmt(w[0]['accel'])} -> {fmt(w[-1]['accel'])}, colour drift"
            f" {fmt(w[0]['colour_drift'])} -> {fmt(w[-1]['colour_drift'])}; worst vs first "
            + ", ".join(f"{k} {fmt(v)}" for k, v in m["worst_degradation_vs_first"].items())
        )
    if row.name == "interpolation" and m:
        rep, fade = b["nearest_key_frame"], b["cross_fade"]
        return (
            f"centroid err {fmt(m['trajectory_error'])} vs repeat {fmt(rep['trajectory_error'])};"
            f" mask IoU {fmt(m['mask_iou'])} vs cross-fade {fmt(fade['mask_iou'])}, repeat {fmt(rep['mask_iou'])};"
            f" key-frame PSNR {fmt(m.get('psnr_key_frames'))}"
        )
    if row.name == "ablation" and m:
        a = b["attention_only"]
        return (
            f"accel gap to real: full {fmt(m['accel_gap_to_real'])} vs attention-only {fmt(a['accel_gap_to_real'])};"
            f" colour drift {fmt(m['identity']['colour_drift'])} vs {fmt(a['identity']['colour_drift'])}"
        )
    if row.name == "decoder" and m:
        d = b["image_decoder"]
        return (
            f"tde {fmt(m['tde'])} vs image {fmt(d['tde'])} ({m['tde_reduction']:.0%} lower);"
            f" PSNR {fmt(m['psnr'])} vs {fmt(d['psnr'])} dB"
        )
    if row.name == "upsampler" and m:
        i, bc = b["image_mode"], b["bicubic"]
        return (
            f"tde {fmt(m['tde'])} vs image mode {fmt(i['tde'])} ({m['tde_reduction']:.0%} lower), bicubic"
            f" {fmt(bc['tde'])}; PSNR {fmt(m['psnr'])} vs {fmt(i['psnr'])}, bicubic {fmt(bc['psnr'])} dB"
        )
    if row.name == "personalisation" and m:
        a, bi = b["A_plus_temporal"], b["B_image_mode"]
        return (
            f"concept in {fmt(m['concept_fraction'])} of frames vs A+temporal {fmt(a['concept_fraction'])};"
            f" accel {fmt(m['motion']['accel'])} vs B image mode {fmt(bi['motion']['accel'])}"
            f" (x{fmt(m['accel_ratio_vs_image_mode'])})"
        )
    if row.name == "cascade" and m:
        ik, r = b["image_key_frames"], b["real_clips"]
        return (
            f"{m.get('frames')} frames at {m.get('size')} px: accel {fmt(m['motion']['accel'])} vs image keys"
            f" {fmt(ik['motion']['accel'])}, real {fmt(r['motion']['accel'])}; colour drift"
            f" {fmt(m['identity']['colour_drift'])} vs {fmt(ik['identity']['colour_drift'])},"
            f" real {fmt(r['identity']['colour_drift'])}"
        )
    return row.note or "-"


def table(rows: list[Row]) -> str:
    head = f"{'row':<16}{'shown':<7}figures"
    lines = [head, "-" * 100]
    for r in rows:
        lines.append(f"{r.name:<16}{('yes' if r.shown else 'no'):<7}{headline(r)}")
    return "\n".join(lines)


def write_summary(path: str | Path, rows: list[Row], extra: dict) -> Path:
    by = {r.name: r for r in rows}
    missing = [n for n in ROWS if n not in by]
    if missing:
        raise ValueError(f"summary without rows {missing}: every row gets an entry (not_built says why)")
    # one top-level entry per row, as issue 13 names them; how the run went sits under "run"
    data = {**{n: by[n].as_dict() for n in ROWS}, "run": _rounded(extra)}
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
    return Path(path)
