"""Print eval results of a run from its directory alone (no W&B needed).

    python -m vldm.eval.report RUN [--suite HASH_OR_NAME] [--format table|csv|json] [--all]

One table per suite: a row per checkpoint step, a column per metric; checkpoints still pending or
failed are listed under it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from vldm.checkpoint import complete_checkpoints
from vldm.eval.layout import ERROR, RESULT, suite_dir
from vldm.eval.results import read_results


def _columns(results: list[dict], all_metrics: bool) -> list[str]:
    keys = sorted({k for r in results for k in r["metrics"]})
    # per-timestep losses are many and mostly noise at a glance: shown with --all
    return keys if all_metrics else [k for k in keys if "/val_loss_t" not in k]


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(results: list[dict], all_metrics: bool = False) -> str:
    cols = _columns(results, all_metrics)
    rows = [["step", *cols]] + [[str(r["step"]), *(_fmt(r["metrics"].get(c)) for c in cols)] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_csv(results: list[dict], all_metrics: bool = False) -> str:
    cols = _columns(results, all_metrics)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", *cols])
    for r in results:
        w.writerow([r["step"], *(r["metrics"].get(c, "") for c in cols)])
    return buf.getvalue()


def status(run_dir: Path, suite_hash: str) -> tuple[list[str], list[str]]:
    """(pending, failed) checkpoint names for one suite."""
    pending, failed = [], []
    for ck in complete_checkpoints(run_dir):
        d = suite_dir(run_dir, suite_hash) / ck.name
        if (d / RESULT).exists():
            continue
        (failed if (d / ERROR).exists() else pending).append(ck.name)
    return pending, failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Eval results per checkpoint, read from RUN/eval/ (no W&B).")
    p.add_argument("run_dir", help="training run directory")
    p.add_argument("--suite", default="", help="only this suite (hash prefix or suite name)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--all", action="store_true", help="also per-timestep validation losses")
    a = p.parse_args(argv)
    run = Path(a.run_dir)
    by_suite = read_results(run)
    if a.suite:
        by_suite = {h: rs for h, rs in by_suite.items() if h.startswith(a.suite) or rs[0]["suite"] == a.suite}
    if not by_suite:
        print(f"no eval results under {run / 'eval'}", file=sys.stderr)
        return 1
    if a.format == "json":
        print(
            json.dumps(
                {h: [{"step": r["step"], "metrics": r["metrics"]} for r in rs] for h, rs in by_suite.items()}, indent=2
            )
        )
        return 0
    for h, rs in by_suite.items():
        if a.format == "csv":
            print(f"# suite {rs[0]['suite']} {h}")
            print(to_csv(rs, a.all), end="")
            continue
        print(f"suite {rs[0]['suite']!r} ({h}): {len(rs)} checkpoint(s)")
        print(table(rs, a.all))
        for metric, info in sorted(rs[-1]["details"].items()):
            for w in info.get("warnings", []):
                print(f"  note {metric}: {w}")
        pending, failed = status(run, h)
        if pending:
            print(f"  pending: {', '.join(pending)}")
        if failed:
            print(f"  failed:  {', '.join(failed)} (see {ERROR} in RUN/eval/{h}/<step>/)")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
