"""Read an offline W&B run file (`offline-run-*/run-<id>.wandb`) without W&B's servers.

wandb 0.31 has no Python reader for it. The file is a LevelDB-style log: a 7-byte header (":W&B",
version), then 32 KiB blocks of records framed as (crc32 u32, length u16, type u8); type 1 is a full
record, 2/3/4 the first/middle/last piece of one split across blocks (`vldm.io.leveldb_log_records`, shared
with the trainer's W&B fallback). Each record is a `wandb_internal_pb2.Record` protobuf. A file whose writer
was killed mid-record reads up to its last whole record.

    python -m vldm.eval.wandb_reader path/to/run-xyz.wandb     # history keys and counts
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from vldm.io import leveldb_log_records


def raw_records(path: str | Path) -> Iterator[bytes]:
    return leveldb_log_records(path, b":W&B")


def records(path: str | Path) -> Iterator:
    from wandb.proto import wandb_internal_pb2 as pb

    for blob in raw_records(path):
        r = pb.Record()
        r.ParseFromString(blob)
        yield r


def history(path: str | Path) -> list[dict]:
    """Every logged row as {key: decoded JSON value} (media appear as their JSON descriptors)."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def metric_definitions(path: str | Path) -> dict[str, str]:
    """{metric name or glob: step metric} from `define_metric` records."""
    out = {}
    for r in records(path):
        if r.WhichOneof("record_type") == "metric":
            m = r.metric
            out[m.name or m.glob_name] = m.step_metric
    return out


def run_info(path: str | Path) -> dict:
    """id, group, job type and project of the run record."""
    for r in records(path):
        if r.WhichOneof("record_type") == "run":
            return {"id": r.run.run_id, "group": r.run.run_group, "job_type": r.run.job_type, "project": r.run.project}
    return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vldm.eval.wandb_reader",
        description="Print the run record, every history row and the record counts of an offline W&B run file.",
    )
    ap.add_argument("path", help="offline-run-*/run-<id>.wandb")
    path = ap.parse_args(argv).path
    kinds = Counter(r.WhichOneof("record_type") for r in records(path))
    print(json.dumps(run_info(path)))
    for row in history(path):
        print({k: (v if not isinstance(v, dict) else v.get("_type", "dict")) for k, v in row.items()})
    print(dict(kinds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
