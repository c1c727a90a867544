"""An evaluation suite: loading it, its protocol, and the hash that names its results.

The protocol is every field of `EvalSuite` except `name`, `pool` and `wandb`, restricted to the
metrics that are enabled, with every file the suite names replaced by its content hash (weights,
prompt file) or its listing hash (real videos). `suite_hash` is the sha256 of that protocol: the same
measurement anywhere gets the same hash, any change to what is measured gets a new one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from vldm.config.core import build_config, to_dict
from vldm.config.eval import EvalSuite

# Bump when the meaning of a metric changes in code (preprocessing, estimator): old results then stop
# matching instead of being silently compared with new ones.
PROTOCOL_VERSION = 1
HASH_LEN = 16


def load_suite(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> EvalSuite:
    """Typed defaults <- YAML file <- `key=value` overrides (unknown keys are errors)."""
    return build_config(EvalSuite, [path] if path else [], overrides)


def prompts(suite: EvalSuite) -> list[str]:
    if suite.sampling.prompts_file:
        lines = Path(suite.sampling.prompts_file).expanduser().read_text().splitlines()
        out = [ln.strip() for ln in lines if ln.strip()]
        if not out:
            raise ValueError(f"sampling.prompts_file {suite.sampling.prompts_file} has no prompts")
        return out
    return list(suite.sampling.prompts)


def sample_seed(suite_seed: int, index: int) -> int:
    """Seed of sample `index`: a hash of the suite seed and the index only (not the worker, not the batch)."""
    digest = hashlib.sha256(f"vldm-eval-sample:{suite_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: a valid torch seed


def sample_spec(suite: EvalSuite, index: int, prompt_list: list[str] | None = None) -> dict:
    """What sample `index` is: its prompt, class label (or None) and seed."""
    ps = prompt_list if prompt_list is not None else prompts(suite)
    labels = suite.sampling.class_labels
    return {
        "index": index,
        "prompt": ps[index % len(ps)],
        "label": labels[index % len(labels)] if labels else None,
        "seed": sample_seed(suite.sampling.seed, index),
    }


def protocol(suite: EvalSuite) -> dict:
    """The hashed description of what is measured (paths replaced by content hashes)."""
    from vldm.eval.extractors import verify_weights
    from vldm.eval.videoio import list_videos, listing_digest

    d = to_dict(suite)
    out: dict = {"protocol_version": PROTOCOL_VERSION, "sampling": d["sampling"], "video": d["video"]}
    s = out["sampling"]
    if s["prompts_file"]:
        s["prompts"] = prompts(suite)  # the content is the protocol, the path is not
        s["prompts_file"] = hashlib.sha256("\n".join(s["prompts"]).encode()).hexdigest()
    if suite.val_loss.enabled:
        out["val_loss"] = d["val_loss"]
        if suite.val_loss.data:
            refs = list_videos(suite.val_loss.data, suite.val_loss.num_clips)
            out["val_loss"]["data"] = listing_digest(refs)
    if suite.fvd.enabled or suite.fid.enabled:
        refs = list_videos(suite.real.videos, suite.real.num_videos)
        out["real"] = {"listing_sha256": listing_digest(refs), "num_videos": suite.real.num_videos}
    for name, key in (("fvd", "weights"), ("fid", "weights"), ("clipsim", "model_dir")):
        sec = getattr(suite, name)
        if sec.enabled or (
            name == "clipsim" and suite.video.consistency and suite.video.consistency_features == "clip"
        ):
            entry = d[name]
            # the content is the protocol, not the path; a pinned sha256 that differs is refused here
            entry["sha256"] = verify_weights(entry.pop(key), entry["sha256"], f"{name}.{key}")
            out[name] = entry
    if not suite.video.consistency:
        out["video"].pop("consistency_features")
        out["video"].pop("consistency_size")
    return out


@dataclass(frozen=True)
class Resolved:
    """Suite values of 0 ("the run's own") resolved against a run's config; recorded in every result."""

    num_frames: int
    height: int
    width: int
    val_frames: int
    val_size: int
    fid_frames: int

    def as_dict(self) -> dict:
        return asdict(self)


def resolve(suite: EvalSuite, run_cfg) -> Resolved:
    """Fill the suite's 0 = "from the run" fields from the run's `Config` and check they fit the metrics."""
    data = run_cfg.data
    s, v = suite.sampling, suite.val_loss
    r = Resolved(
        num_frames=s.num_frames or data.num_frames,
        height=s.height or data.size,
        width=s.width or data.size,
        val_frames=v.num_frames or data.num_frames,
        val_size=v.size or data.size,
        fid_frames=suite.fid.num_frames or s.num_frames or data.num_frames,
    )
    if suite.fvd.enabled:
        need = (suite.fvd.num_frames - 1) * suite.fvd.stride + 1
        if r.num_frames < need:
            raise ValueError(
                f"FVD needs {need} frames per video ({suite.fvd.num_frames} at stride {suite.fvd.stride}); "
                f"sampling.num_frames resolves to {r.num_frames}"
            )
    if (suite.video.flicker or suite.video.consistency) and r.num_frames < 2:
        raise ValueError("flicker/consistency need videos of at least 2 frames")
    if suite.fid.enabled and r.fid_frames > r.num_frames:
        raise ValueError(f"fid.num_frames={r.fid_frames} exceeds the {r.num_frames} sampled frames")
    return r


def protocol_hash(protocol_dict: dict) -> str:
    blob = json.dumps(protocol_dict, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:HASH_LEN]


def suite_hash(suite: EvalSuite) -> str:
    """Short sha256 of the protocol: the name of `RUN/eval/<suite_hash>/`."""
    return protocol_hash(protocol(suite))


def verify_pinned_weights(suite: EvalSuite) -> dict[str, str]:
    """sha256 of every weight file the suite uses, refusing any that differs from a pinned value."""
    from vldm.eval.extractors import verify_weights

    out = {}
    if suite.fvd.enabled:
        out["fvd"] = verify_weights(suite.fvd.weights, suite.fvd.sha256, "fvd.weights (I3D)")
    if suite.fid.enabled:
        out["fid"] = verify_weights(suite.fid.weights, suite.fid.sha256, "fid.weights (Inception)")
    if suite.clipsim.enabled or (suite.video.consistency and suite.video.consistency_features == "clip"):
        out["clipsim"] = verify_weights(suite.clipsim.model_dir, suite.clipsim.sha256, "clipsim.model_dir (CLIP)")
    return out
