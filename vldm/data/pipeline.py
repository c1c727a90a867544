"""The sharding run on Ray: plan -> shard tasks (+ latent actors) -> stats. Driven by data_prep/shard_videos.py.

Architecture (no frames ever enter the object store):
- the driver lists the inputs, fixes the plan (plan.py) and submits one task per missing shard, at
  most `workers` at a time: the window bounds memory (one video per task in flight) whatever the
  corpus size. A task gets a few hundred small input records, reads the videos by path and writes
  its shard to OUTPUT itself (shards.write_shard); it returns a small summary.
- with --shot-detector transnetv2, a pool of ShotDetector actors (a GPU fraction each where the cluster
  has GPUs, one CPU otherwise) writes each shard's shots file first, shard by shard in plan order; each
  shard's task starts as soon as its file is there, so detection and clip cutting overlap. The actors are
  killed when the last shard's shots are written: their CPUs go back to the shard tasks.
- with --encode-latents, complete shards go to a pool of LatentEncoder actors as they finish (with buckets,
  each bucket's part of a shard is one unit of work).
- progress (clips/s, ETA) comes from the done markers and the journals of running shards.
Complete shards are skipped without starting Ray, so a rerun of a finished run is a no-op.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from vldm.config.data import ShardConfig
from vldm.data.clips import ClipSpec
from vldm.data.curate.shots import ShotDetector, actor_options, default_actors, read_shots
from vldm.data.fsutil import DirLock, DirLocked
from vldm.data.latents import LatentEncoder, needs_latents
from vldm.data.plan import Plan, PlanMismatch, check_settings, load_plan, make_plan, save_plan
from vldm.data.report import aggregate
from vldm.data.shards import journal_path, read_done, read_journal, shard_dirs, write_shard
from vldm.data.sources import list_inputs

log = logging.getLogger("vldm.data")
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a `ray job submit` job


def in_ray_job() -> bool:
    return JOB_ENV in os.environ


def _runtime_env() -> dict[str, Any] | None:
    """Workers must import vldm. When it is installed in this environment (pip install -e .), the
    cluster's workers (same environment: Ray requires matching versions anyway) import it as we do,
    and Ray can use its pre-started workers (measured: 2.6 s to the first task instead of 5.9 s). When
    it runs from a checkout, point the workers' PYTHONPATH at it."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vldm")
        return None
    except PackageNotFoundError:
        import vldm

        root = str(Path(vldm.__file__).resolve().parents[1])
        return {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}}


def _loopback_only(address: str) -> bool:
    """Whether the cluster we will use is (or will be) a single machine on loopback."""
    addr = address or os.environ.get("RAY_ADDRESS", "")
    if not addr:
        try:  # where `ray start` records the running local cluster
            addr = Path(os.environ.get("RAY_TMPDIR", "/tmp/ray"), "ray_current_cluster").read_text().strip()
        except OSError:
            return True  # nothing running: we start a private one
    host = addr.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def connect(address: str, workers: int) -> str:
    """Attach to a Ray cluster, or start a private local one. Returns how."""
    if not in_ray_job() and "ray" not in sys.modules and (address == "local" or _loopback_only(address)):
        # Ray rewrites a 127.0.0.1 address to the host's eth0 address unless this is 0, and a head
        # started on loopback (scripts/ray_local_up.sh) is not reachable there: ray.init hangs.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return "already connected"
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if in_ray_job():
        ray.init(**quiet)  # the job's cluster; its runtime_env (working dir) already carries vldm
        return "ray job cluster"
    env = _runtime_env()
    if address == "local":  # a private instance even when a cluster is running (benchmarks, isolation)
        ray.init(
            address="local",
            num_cpus=workers or None,
            object_store_memory=128 << 20,
            include_dashboard=False,
            runtime_env=env,
            **quiet,
        )
        return "private local Ray"
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None, runtime_env=env, **quiet)
        return f"cluster at {address or os.environ['RAY_ADDRESS']}"
    try:
        ray.init(address="auto", runtime_env=env, **quiet)
        return "running local cluster"
    except ConnectionError:
        # nothing is running: a private instance, sized to the requested workers; its object store
        # stays small because only small summaries travel through it
        ray.init(
            num_cpus=workers or None, object_store_memory=128 << 20, include_dashboard=False, runtime_env=env, **quiet
        )
        return "private local Ray"


def _clean_temps(out: Path) -> None:
    """Leftovers of killed writers (temp tars, half-written json), also in bucket directories. Safe: we hold
    the directory lock."""
    for d in [out, *(p for p in out.iterdir() if p.is_dir() and _is_bucket_dir(p.name))]:
        for p in d.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)


def _is_bucket_dir(name: str) -> bool:
    parts = name.split("x")
    return len(parts) == 3 and all(p.isdigit() for p in parts)


def _latent_units(out: Path, name: str, cfg: ShardConfig) -> list[tuple[str, str]]:
    """(directory, shard) pairs of a complete shard that still need latents."""
    summary = read_done(out, name)
    if summary is None:
        return []
    return [
        (str(d), name) for d in shard_dirs(out, summary) if needs_latents(read_done(d, name), cfg.vae, cfg.text_encoder)
    ]


def _same_input(a: str, b: str) -> bool:
    norm = lambda p: p if "://" in p and not p.startswith("file://") else os.path.realpath(p.removeprefix("file://"))  # noqa: E731
    return norm(a) == norm(b)


def _get_plan(cfg: ShardConfig, out: Path, spec: ClipSpec) -> Plan:
    plan = load_plan(out)
    if plan is not None:
        check_settings(plan, cfg)
        if _same_input(plan.settings.get("input", ""), cfg.input):
            return plan
        raise PlanMismatch(
            f"OUTPUT holds a run over INPUT {plan.settings.get('input')!r}, not {cfg.input!r}: "
            "give a retry (e.g. OUTPUT/failed.jsonl) its own OUTPUT directory"
        )
    t = time.time()
    records, dups = list_inputs(cfg.input, tuple(e for e in cfg.extensions.split(",") if e))
    plan = make_plan(cfg, records, dups, spec)
    save_plan(out, plan)
    log.info(
        "planned %d inputs (%d duplicates dropped) into %d shards of %d videos (~%.1f clips/video) in %.1f s",
        len(plan.inputs),
        dups,
        plan.num_shards,
        plan.videos_per_shard,
        plan.clips_per_video,
        time.time() - t,
    )
    return plan


class _Progress:
    def __init__(self, todo_videos: int, run_id: str, every: float):
        self.todo_videos, self.run_id, self.every = todo_videos, run_id, every
        self.t0 = self.last = time.time()
        self.videos = self.clips = self.failed = 0  # finished shards of this run
        self.shards_done = 0
        self.last_msg = ""

    def shard_finished(self, summary: dict[str, Any]) -> None:
        self.shards_done += 1
        self.videos += summary["inputs"]
        self.clips += summary["samples"]
        self.failed += len(summary["failed"])

    def maybe_log(
        self, out: Path, running: list[str], total_shards: int, skipped: int, force: bool = False, latents: str = ""
    ) -> None:
        now = time.time()
        if not force and now - self.last < self.every:
            return
        self.last = now
        videos, clips = self.videos, self.clips
        for name in running:  # partial progress of shards being written
            ev = [e for e in read_journal(journal_path(out, name)) if e.get("run") == self.run_id]
            if ev:
                latest = ev[-1]["attempt"]
                ends = [e for e in ev if e["attempt"] == latest and e["ev"] == "end"]
                videos += len(ends)
                clips += sum(e.get("clips", 0) for e in ends)
        elapsed = max(now - self.t0, 1e-9)
        todo_videos = self.todo_videos
        rate = videos / elapsed
        eta = (todo_videos - videos) / rate if rate > 0 else float("nan")
        msg = (
            f"{self.shards_done + skipped}/{total_shards} shards ({skipped} skipped) | {videos}/{todo_videos} videos | "
            f"{clips} clips | {clips / elapsed:.1f} clips/s | {self.failed} failed | "
            f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta)) if eta == eta else '?'}{latents}"
        )
        if msg != self.last_msg:
            log.info("%s", msg)
            self.last_msg = msg


def run(cfg: ShardConfig) -> int:
    """The whole sharding run; returns the process exit status (0: every shard complete)."""
    out = Path(cfg.output)
    if in_ray_job() and not out.is_absolute():
        log.error(
            "OUTPUT %r is relative, but under `ray job submit` the driver runs in a temp copy of the working dir: "
            "pass an absolute path (e.g. $PWD/%s)",
            cfg.output,
            cfg.output,
        )
        return 2
    out.mkdir(parents=True, exist_ok=True)
    try:
        with DirLock(out):
            _clean_temps(out)
            try:
                return _run_locked(cfg, out)
            finally:
                # a task whose node died mid-write (raylet or host lost) leaves its temp tar behind; Ray ran it
                # again elsewhere, so once every task has ended the leftover is only an orphan
                _clean_temps(out)
    except (PlanMismatch, FileNotFoundError, DirLocked) as e:  # the user's to fix: no traceback
        log.error("%s", e)
        return 2


def _run_locked(cfg: ShardConfig, out: Path) -> int:
    t0 = time.time()
    run_id = uuid.uuid4().hex[:16]
    spec = ClipSpec.from_config(cfg)
    plan = _get_plan(cfg, out, spec)
    names = [plan.shard_name(i) for i in range(plan.num_shards)]
    todo = [i for i, n in enumerate(names) if read_done(out, n) is None]
    skipped = len(names) - len(todo)
    latent_todo = [u for n in names for u in (_latent_units(out, n, cfg) if cfg.encode_latents else [])]
    errors: dict[str, str] = {}
    workers = cfg.workers
    startup = 0.0
    if todo or latent_todo:
        t_connect = time.time()
        how = connect(cfg.ray_address, cfg.workers)
        startup = time.time() - t_connect
        import ray

        workers = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        log.info(
            "run %s on %s: %d shards to write, %d complete, %d to add latents to; %d workers",
            run_id,
            how,
            len(todo),
            skipped,
            len(latent_todo),
            workers,
        )
        _execute(cfg, out, plan, spec, run_id, todo, latent_todo, skipped, workers, errors)
    else:
        log.info("all %d shards complete%s: nothing to do", len(names), " with latents" if cfg.encode_latents else "")
    stats = aggregate(
        out,
        plan,
        {
            "run_id": run_id,
            "elapsed": time.time() - t0,
            "shards_skipped": skipped,
            "errors": errors,
            "workers": workers,
            "ray_startup_s": startup,
        },
    )
    inp = stats["inputs"]
    reasons = ", ".join(f"{k} {v}" for k, v in inp["failed_by_reason"].items())
    log.info(
        "done: %d/%d shards complete | %d inputs: %d ok, %d failed%s | %d clips (%.0f s of video, %.1f MB) | "
        "this run: %d clips in %.1f s (Ray start-up %.1f s) = %.1f clips/s",
        stats["shards"]["complete"],
        stats["shards"]["total"],
        inp["unique"],
        inp["ok"],
        inp["failed"],
        f" ({reasons})" if reasons else "",
        stats["clips"],
        stats["seconds"],
        stats["bytes"] / 1e6,
        stats["run"]["clips"],
        stats["run"]["elapsed"],
        startup,
        stats["run"]["clips_per_s"],
    )
    if inp["failed"]:
        log.info(
            "failed inputs are listed in %s; retry them with: shard_videos.py %s NEW_OUTPUT",
            out / "failed.jsonl",
            out / "failed.jsonl",
        )
    if errors or stats["shards"]["incomplete"]:
        log.error(
            "%d shards incomplete (%s): rerun the same command to finish them",
            len(stats["shards"]["incomplete"]),
            "; ".join(f"{k}: {v}" for k, v in list(errors.items())[:3]),
        )
        return 1
    return 0


def _execute(
    cfg: ShardConfig,
    out: Path,
    plan: Plan,
    spec: ClipSpec,
    run_id: str,
    todo: list[int],
    latent_todo: list[tuple[str, str]],
    skipped: int,
    workers: int,
    errors: dict[str, str],
) -> None:
    import ray

    # max_calls: a fresh worker process every few shards, so a native leak in a decoder (we always close
    # containers; FFmpeg's own caches are another matter) cannot grow without bound
    task = ray.remote(num_cpus=1, max_retries=cfg.max_retries, max_calls=25)(write_shard)
    pending: dict[Any, str] = {}  # ObjectRef -> shard name
    need_shots = spec.shot_detector == "transnetv2"
    # shards wait for their shots file (TransNetV2) before their task is submitted
    shot_queue = deque(i for i in todo if need_shots and read_shots(out, plan.shard_name(i)) is None)
    waiting = set(shot_queue)
    queue = deque(i for i in todo if i not in waiting)
    shot_pending: dict[Any, tuple[int, Any]] = {}
    shot_actors: list[Any] = []
    shot_idle: list[Any] = []
    progress = _Progress(sum(len(plan.shard_inputs(i)) for i in todo), run_id, cfg.log_every)
    actors: list[Any] = []
    idle: list[Any] = []
    latent_pending: dict[Any, tuple[str, Any]] = {}
    latent_queue = deque(latent_todo)
    latent_done = 0
    flat = not spec.buckets

    def latent_line() -> str:
        if not cfg.encode_latents:
            return ""
        total = len(latent_todo) + len(todo) if flat else latent_done + len(latent_queue) + len(latent_pending)
        return f" | latents {latent_done}/{total} {'shards' if flat else 'bucket shards'}"

    while queue or pending or latent_queue or latent_pending or shot_queue or shot_pending:
        if shot_queue and not shot_actors:
            gpus = float(ray.cluster_resources().get("GPU", 0))
            n = cfg.shot_actors or default_actors(gpus, cfg.shot_gpu_fraction)
            opts = actor_options(gpus, cfg.shot_gpu_fraction)
            actor_cls = ray.remote(max_restarts=1, max_task_retries=1, **opts)(ShotDetector)
            shot_actors = [actor_cls.remote(cfg.shot_threshold, "auto", 1) for _ in range(n)]
            shot_idle = list(shot_actors)
            where = f"{opts['num_gpus']:g} GPU each" if gpus else "1 CPU each"
            log.info("shot stage: %d TransNetV2 actor(s) (%s)", n, where)
        while shot_queue and shot_idle:
            i, actor = shot_queue.popleft(), shot_idle.pop()
            items = [(j, r.as_dict()) for j, r in plan.shard_inputs(i)]
            ref = actor.detect_shard.remote(str(out), plan.shard_name(i), items, spec.timeout)
            shot_pending[ref] = (i, actor)
        if latent_queue and not actors:
            # started with the first latent work, not before: on a CPU box the actors' model imports
            # would otherwise take the cores the first shard tasks need
            gpus = int(ray.cluster_resources().get("GPU", 0))
            n = cfg.latent_actors or max(1, gpus)
            actor_cls = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0, max_restarts=1, max_task_retries=1)(
                LatentEncoder
            )
            actors = [actor_cls.remote(cfg.vae, cfg.text_encoder, cfg.latent_batch, cfg.latent_dtype) for _ in range(n)]
            idle = list(actors)
            log.info("latent stage: %d VAE actor(s) (%s)", n, f"{gpus} GPUs" if gpus else "CPU")
        while queue and len(pending) < workers:
            i = queue.popleft()
            items = [(j, r.as_dict()) for j, r in plan.shard_inputs(i)]
            pending[task.remote(str(out), plan.shard_name(i), items, spec, run_id, cfg.source_hash)] = plan.shard_name(
                i
            )
        while latent_queue and idle:
            (d, name), actor = latent_queue.popleft(), idle.pop()
            latent_pending[actor.encode_shard.remote(d, name)] = (name, actor)
        refs = list(pending) + list(latent_pending) + list(shot_pending)
        ready, _ = ray.wait(refs, num_returns=1, timeout=min(1.0, cfg.log_every))
        for ref in ready:
            if ref in pending:
                name = pending.pop(ref)
                try:
                    summary = ray.get(ref)
                    progress.shard_finished(summary)
                    if cfg.encode_latents:
                        latent_queue.extend(_latent_units(out, name, cfg))
                except Exception as e:  # the task failed for good (its retries are spent)
                    errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    log.error("shard %s failed: %s", name, e)
            elif ref in shot_pending:
                i, actor = shot_pending.pop(ref)
                shot_idle.append(actor)
                try:
                    ray.get(ref)
                    queue.append(i)
                except Exception as e:
                    errors[plan.shard_name(i)] = (
                        f"shots: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    )
                    log.error("shot detection of shard %s failed: %s", plan.shard_name(i), e)
            else:
                name, actor = latent_pending.pop(ref)
                idle.append(actor)
                try:
                    ray.get(ref)
                    latent_done += 1
                except Exception as e:
                    errors[name] = f"latents: {type(e).__name__}: {e}"
                    log.error("latents of shard %s failed: %s", name, e)
        if not shot_queue and not shot_pending:
            for a in shot_actors:  # their CPUs (or GPU share) go back to the shard tasks
                ray.kill(a)
            shot_actors, shot_idle = [], []
        progress.maybe_log(out, list(pending.values()), plan.num_shards, skipped, latents=latent_line())
    progress.maybe_log(out, [], plan.num_shards, skipped, force=True, latents=latent_line())
    for a in actors + shot_actors:
        ray.kill(a)


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="[shard_videos] %(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
