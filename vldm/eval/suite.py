"""An evaluation suite: loading it, its protocol, and the hash that names its results.

The protocol is every field of `EvalSuite` except `name`, `pool` and `wandb`, restricted to the
metrics that are enabled, with every file the suite names replaced by its content hash (weights,
prompt file) or its listing hash (real videos). `suite_hash` is the sha256 of that protocol: the same
measurement anywhere gets the same hash, any change to what is measured gets a new one.
"""

from __future__ import annotations

import hashlib
import json
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
    return {"index": index, "prompt": ps[index % len(ps)],
            "label": labels[index % len(labels)] if labels else None,
            "seed": sample_seed(suite.sampling.seed, index)}


def protocol(suite: EvalSuite) -> dict:
    """The hashed description of what is measured (paths replaced by content hashes)."""
    from vldm.eval.extractors import weights_sha256
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
        if sec.enabled or (name == "clipsim" and suite.video.consistency and suite.video.consistency_features == "clip"):
            entry = d[name]
            entry["sha256"] = weights_sha256(entry.pop(key))
            out[name] = entry
    if not suite.video.consistency:
        out["video"].pop("consistency_features")
        out["video"].pop("consistency_size")
    return out


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
