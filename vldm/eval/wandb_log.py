"""W&B logging of eval results, beside the training run.

One eval run per (training run, suite): same group as the training run, a deterministic id (so a
restarted pool resumes the same W&B run), `eval/*` plotted against `trainer/global_step`
(`define_metric`: results arrive newest checkpoint first, W&B's own step cannot be the x axis).
Samples are logged as the mp4 files themselves (`wandb.Video(path)`: no re-encoding, no moviepy),
plus a grid of first frames. With W&B off or missing, `NullLogger` keeps the pool free of "if logging".
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from vldm.config.eval import EvalWandbConfig
from vldm.eval.layout import step_dir


class NullLogger:
    enabled = False
    run_id = ""

    def log_result(self, result: dict, run_dir: Path) -> None:
        pass

    def finish(self) -> None:
        pass


def training_wandb(run_dir: Path, run_cfg=None) -> dict[str, str]:
    """The training run's W&B group, project and entity (`wandb.*` of its config; the trainer's
    defaults when unset: group = the run dir's name)."""
    w = getattr(run_cfg, "wandb", None)
    return {
        "group": getattr(w, "group", "") or Path(run_dir).resolve().name,
        "project": getattr(w, "project", "") or "vldm",
        "entity": getattr(w, "entity", "") or "",
    }


def eval_run_id(group: str, run_dir: Path, suite_hash: str) -> str:
    """Deterministic W&B id: the same training run and suite always resume the same eval run."""
    digest = hashlib.sha256(f"{group}|{Path(run_dir).resolve().name}|{suite_hash}".encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_-]", "-", Path(run_dir).resolve().name)[:24]
    return f"eval-{slug}-{digest}"


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    # without an API key an online init fails at once: fall back to offline (sync later with `wandb sync`)
    if os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").exists():
        return "online"
    return "offline"


class WandbLogger:
    """Starts the W&B run on the first result, so a pool with nothing new to report creates no run."""

    enabled = True

    def __init__(
        self,
        cfg: EvalWandbConfig,
        run_dir: Path,
        suite_name: str,
        suite_hash: str,
        protocol: dict,
        group: str,
        project: str = "vldm",
        entity: str = "",
    ):
        self.cfg, self.run = cfg, None
        self.run_id = eval_run_id(group, run_dir, suite_hash)
        # files go beside the results unless WANDB_DIR says otherwise: under `ray job submit` the
        # working directory is a temporary copy that disappears with the job
        self._init = dict(
            project=cfg.project or project,
            entity=cfg.entity or entity or None,
            group=group,
            job_type="eval",
            id=self.run_id,
            name=f"eval-{suite_name}-{group}",
            resume="allow",
            mode=resolve_mode(cfg.mode),
            dir=os.environ.get("WANDB_DIR") or str(Path(run_dir) / "eval" / suite_hash),
            config={"suite": suite_name, "suite_hash": suite_hash, "protocol": protocol, "run_dir": str(run_dir)},
        )

    def _start(self):
        import wandb

        self.wandb = wandb
        Path(self._init["dir"]).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(**self._init)
        self.run.define_metric("trainer/global_step")
        self.run.define_metric("eval/*", step_metric="trainer/global_step")

    def log_result(self, result: dict, run_dir: Path) -> None:
        if self.run is None:
            self._start()
        sdir = step_dir(run_dir, result["suite_hash"], Path(result["checkpoint"]).name)
        data: dict = {"trainer/global_step": result["step"]}
        data.update({f"eval/{k}": v for k, v in result["metrics"].items()})
        for variant, vids in result["videos"].items():
            media = [
                self.wandb.Video(str(sdir / v["path"]), caption=f"#{v['index']} {v['prompt']}", format="mp4")
                for v in vids[: self.cfg.log_videos]
                if (sdir / v["path"]).exists()
            ]
            if media:
                data[f"eval/{variant}/samples"] = media
        for variant, png in result.get("first_frame_grids", {}).items():
            if (sdir / png).exists():
                data[f"eval/{variant}/first_frames"] = self.wandb.Image(
                    str(sdir / png), caption=f"step {result['step']}"
                )
        self.run.log(data)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            # finish() returns before the service has written the run file (offline: measured 7 bytes
            # on disk right after it); teardown waits for it, so the file is complete when we return
            self.wandb.teardown()
            self.run = None


def make_logger(
    cfg: EvalWandbConfig, run_dir: Path, suite_name: str, suite_hash: str, protocol: dict, run_cfg=None
) -> WandbLogger | NullLogger:
    """The eval run's logger; group, project and entity default to the training run's."""
    if not cfg.enabled or resolve_mode(cfg.mode) == "disabled":
        return NullLogger()
    try:
        import wandb  # noqa: F401
    except ImportError:
        print("[eval] wandb is not installed: results are written to the run dir only")
        return NullLogger()
    train = training_wandb(run_dir, run_cfg)
    return WandbLogger(
        cfg, run_dir, suite_name, suite_hash, protocol, cfg.group or train["group"], train["project"], train["entity"]
    )
