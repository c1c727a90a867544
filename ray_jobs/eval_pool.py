"""Evaluate every checkpoint of a training run on a pool of Ray worker actors, beside training.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python ray_jobs/eval_pool.py --run-dir RUN --once --suite configs/eval/tiny.yaml

Polls RUN/checkpoints for complete checkpoints without a result for this suite (newest first), splits
each into shards, and runs them on worker actors (one GPU each when the cluster has GPUs, else
`pool.cpus_per_worker` CPUs). Results: RUN/eval/<suite_hash>/step_<N>/result.json, one per
checkpoint; a rerun does nothing for finished work; a killed worker's shard is redone.
`key=value` arguments override suite fields (e.g. `pool.num_workers=4 sampling.num_samples=64`).
`--local` runs everything in this process, without Ray.
Exit status: 0 all evaluated, 1 some checkpoint failed, 2 error, 3 another pool holds this run's suite.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a plain checkout works without `pip install -e .`

from vldm.config.core import from_dict, to_dict  # noqa: E402
from vldm.config.eval import EvalSuite  # noqa: E402
from vldm.eval.coordinator import Coordinator, LocalExecutor, Outcome  # noqa: E402
from vldm.eval.layout import SuiteBusy, SuiteLock  # noqa: E402
from vldm.eval.suite import load_suite  # noqa: E402
from vldm.eval.tasks import ShardTask  # noqa: E402
from vldm.eval.wandb_log import make_logger  # noqa: E402


class EvalActor:
    """A Ray actor around `EvalWorker`: holds the frozen base model for its whole life."""

    def __init__(self, run_dir: str, suite: dict, suite_hash: str, threads: float):
        from vldm.eval.worker import EvalWorker

        self.worker = EvalWorker(run_dir, from_dict(EvalSuite, suite), suite_hash, threads=int(threads))

    def run(self, task: ShardTask) -> dict:
        return self.worker.run(task)

    def pid(self) -> int:
        return os.getpid()


class RayExecutor:
    """Slots backed by actors created on first use and replaced when they die."""

    def __init__(self, run_dir: Path, suite: EvalSuite, suite_hash: str):
        import ray

        self.ray = ray
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        pool = suite.pool
        self.pool = pool
        n = pool.num_workers or max(1, self._capacity())
        self.cls = ray.remote(EvalActor).options(
            num_cpus=pool.cpus_per_worker, num_gpus=1 if gpus else 0, max_restarts=0, name=None
        )
        self.args = (str(run_dir), to_dict(suite), suite_hash, pool.cpus_per_worker)
        self.actors: dict[int, object | None] = {i: None for i in range(n)}
        self.held: dict[int, str] = {i: "" for i in range(n)}
        self.running: dict = {}  # ObjectRef -> (slot, task)
        print(f"[eval] {n} worker actor(s), {'1 GPU' if gpus else f'{pool.cpus_per_worker:g} CPU'} each", flush=True)

    def _capacity(self) -> int:
        """How many worker actors the cluster's live nodes have room for (one per GPU, else per CPUs)."""
        res = self.ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        return gpus if gpus else int(res.get("CPU", 1) // self.pool.cpus_per_worker)

    def idle_slots(self) -> list[tuple[int, str]]:
        busy = {slot for slot, _ in self.running.values()}
        return [(i, self.held[i]) for i in self.actors if i not in busy]

    def submit(self, slot: int, task: ShardTask) -> None:
        if self.actors[slot] is None:
            self.actors[slot] = self.cls.remote(*self.args)
        self.running[self.actors[slot].run.remote(task)] = (slot, task)

    def busy(self) -> int:
        return len(self.running)

    def wait(self, timeout: float | None) -> list[Outcome]:
        ray = self.ray
        ready, _ = ray.wait(list(self.running), num_returns=1, timeout=timeout)
        if ready:  # collect everything else that finished meanwhile, without waiting
            ready, _ = ray.wait(list(self.running), num_returns=len(self.running), timeout=0)
        outs = []
        for ref in ready:
            slot, task = self.running.pop(ref)
            try:
                outs.append(Outcome(task, True, summary=ray.get(ref)))
                self.held[slot] = task.weights_key
            except ray.exceptions.RayActorError as e:
                # killed, OOM, node lost, or its constructor failed: a fresh actor takes the slot, if the
                # cluster still has room for it. After a node is lost it may not: a replacement that can
                # never be placed would hold its retried task forever, so the pool shrinks instead
                self.actors[slot], self.held[slot] = None, ""
                room = self._capacity()
                if len(self.actors) > max(1, room):
                    del self.actors[slot], self.held[slot]
                    print(
                        f"[eval] worker slot {slot} dropped: the cluster has room for {room} actor(s) now", flush=True
                    )
                outs.append(Outcome(task, False, lost=True, error=str(e)))
            except ray.exceptions.RayTaskError as e:
                outs.append(Outcome(task, False, error=str(e)))
        return outs

    def close(self) -> None:
        for a in self.actors.values():
            if a is not None:
                self.ray.kill(a)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="training run directory (holds config.yaml and checkpoints/)")
    p.add_argument("--suite", default=None, help="suite YAML (default: the embedded tiny suite)")
    p.add_argument("--once", action="store_true", help="evaluate what is pending, then exit (default: keep polling)")
    p.add_argument("--local", action="store_true", help="run in this process without Ray (debugging)")
    p.add_argument(
        "--address", default=None, help="Ray address (default: the job's cluster, $RAY_ADDRESS, or a local one)"
    )
    p.add_argument("overrides", nargs="*", help="suite overrides key=value, e.g. pool.num_workers=2")
    return p.parse_args(argv)


_STOP_SIGNAL = 0


def _exit_on_sigterm(signum, frame):
    # SLURM's time limit / scancel: unwind through `finally` (W&B run closed, actors released); every
    # finished shard is already on disk, so the next pool continues from there
    global _STOP_SIGNAL
    if _STOP_SIGNAL:  # a second SIGTERM (scancel signals every process of the job, the batch shell forwards
        return  # one more) must not cut the `finally` that is already running short
    _STOP_SIGNAL = signum
    raise SystemExit(128 + signum)


# a cluster that was just started (slurm/eval_pool.sbatch) can answer slowly while its nodes register: on a busy
# host the GCS misses ray.init's RPC deadlines for tens of seconds. A few bounded retries, then the real error.
CONNECT_ATTEMPTS, CONNECT_WAIT_S = 4, 15.0


def _connect(ray, address: str | None) -> None:
    import time

    for attempt in range(1, CONNECT_ATTEMPTS + 1):
        try:
            ray.init(address=address, log_to_driver=True)
            return
        except ConnectionError as e:
            if attempt == CONNECT_ATTEMPTS:
                raise
            print(
                f"[eval] Ray at {address} did not answer ({e}); retry {attempt}/{CONNECT_ATTEMPTS - 1} in "
                f"{CONNECT_WAIT_S:g} s",
                flush=True,
            )
            ray.shutdown()
            time.sleep(CONNECT_WAIT_S)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    suite = load_suite(args.suite, args.overrides)
    coord = Coordinator(args.run_dir, suite)
    print(f"[eval] run {coord.run_dir}  suite {suite.name!r}  hash {coord.suite_hash}", flush=True)
    try:
        lock = SuiteLock(coord.dir).__enter__()
    except SuiteBusy as e:
        print(f"[eval] {e}: nothing to do", flush=True)
        return 3
    executor = None
    try:
        coord.logger = make_logger(
            suite.wandb, coord.run_dir, suite.name, coord.suite_hash, coord.protocol, coord.run_cfg
        )
        if args.local:
            from vldm.eval.worker import EvalWorker

            executor = LocalExecutor(
                lambda: EvalWorker(coord.run_dir, suite, coord.suite_hash, threads=suite.pool.cpus_per_worker)
            )
        else:
            import ray

            _connect(ray, args.address)
            # ray.init installs a C++ fatal-signal handler that turns SIGTERM into abort() (exit 134, no
            # `finally`): put ours back so scancel / a time limit unwinds cleanly
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
            executor = RayExecutor(coord.run_dir, suite, coord.suite_hash)
        failed = coord.run(executor, once=args.once)
    except SystemExit:
        if _STOP_SIGNAL:  # raised inside ray.wait, Ray replaces our SystemExit(143) by SystemExit(1)
            print(f"[eval] stopped by signal {_STOP_SIGNAL}: finished shards are kept, rerun to continue", flush=True)
            raise SystemExit(128 + _STOP_SIGNAL) from None
        raise
    except Exception:
        traceback.print_exc()
        return 2
    finally:
        if executor is not None:
            executor.close()
        coord.logger.finish()
        lock.__exit__(None, None, None)
    print(
        f"[eval] done: {len(coord.finished)} checkpoint(s) evaluated, {failed} failed (results in {coord.dir})",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
