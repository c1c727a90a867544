"""The trainer's W&B logger alone (no training): its bounds and its offline fallback, with the real SDK and its
real service process, the run files read back with vldm.eval.wandb_reader. The same faults under a whole
rehearsal run are in test_train_faults.py (`-k wandb`); these take seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from train_helpers import ROOT, train_env

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, time, warnings
    from pathlib import Path
    sys.path.insert(0, os.path.join(sys.argv[3], "tests"))
    from vldm.config import Config, build_config
    from vldm.train.logger import WandbLogger, wandb_service_pids

    fault, root = sys.argv[1], Path(sys.argv[2])
    server = None
    extra = sys.argv[4:]
    over = [f"run_dir={root}/run", "wandb.call_timeout_s=3", "wandb.finish_timeout_s=5", "wandb.init_timeout_s=20"]
    if fault == "server-gone":
        from wandb_standin import WandbStandIn

        server = WandbStandIn()
        os.environ.update(WANDB_BASE_URL=server.url, WANDB_API_KEY="k" * 40)
        os.environ.pop("WANDB_MODE", None)
        over.append("wandb.mode=online")
    else:
        over.append("wandb.mode=offline")
    warnings.simplefilter("always")
    logger = WandbLogger(build_config(Config, [], over + extra), {"seed": 1})
    for step in range(1, 4):
        logger.log({"train/loss": 1.0 / step}, step)
    t0 = time.time()
    if server:
        server.stop()
    else:
        os.kill(wandb_service_pids()[0], getattr(signal, fault))
    for step in range(4, 9):
        logger.log({"train/loss": 1.0 / step}, step)
    log_s = time.time() - t0
    t1 = time.time()
    logger.finish(0)
    print("RESULT " + json.dumps({"log_s": log_s, "finish_s": time.time() - t1, "files": logger.files,
                                  "broken": logger.broken, "run_id": logger.run_id}), flush=True)
    """
)


def run_logger(tmp: Path, fault: str, *overrides: str) -> tuple[dict, str]:
    import json

    env = {**train_env(tmp, wandb=True), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, fault, str(tmp), str(ROOT), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, out[-4000:]
    return json.loads(line[0][7:]), out


def steps_in(files: list[Path]) -> list[list[int]]:
    from vldm.eval.wandb_reader import history

    return [[r["trainer/global_step"] for r in history(f) if "train/loss" in r] for f in files]


def test_server_gone_after_an_online_init_log_unaffected_finish_bounded_every_row_in_the_online_file(tmp_path):
    """The W&B server gone mid-run, with a STAND-IN server (tests/wandb_standin.py: W&B's own is a container
    image that cannot run here) answering an online init and then closing its port: log() returns at once,
    finish is cut at wandb.finish_timeout_s, and the online run's local file holds every row once."""
    from vldm.eval.wandb_reader import run_info

    res, out = run_logger(tmp_path, "server-gone")
    assert res["log_s"] < 2.0, res  # log() only hands the row to the service
    assert 5.0 <= res["finish_s"] < 5.0 + 3.0 + 5.0, res  # finish_timeout_s, then the bounded teardown
    assert "finish did not return within 5 s" in out, out[-3000:]
    root = tmp_path / "wandb_home" / "wandb"
    online = sorted(root.glob(f"run-*-{res['run_id']}/run-{res['run_id']}.wandb"))
    offline = sorted(root.glob(f"offline-run-*-{res['run_id']}/run-{res['run_id']}.wandb"))
    assert len(online) == 1 and run_info(online[0])["id"] == res["run_id"], (online, out[-3000:])
    parts = steps_in(online + offline)
    assert [s for p in parts for s in p] == list(range(1, 9)), parts  # each row once, across the files
    assert "wandb sync --include-online" in out
    print(
        f"\nMEASURED server gone: log x5 {res['log_s']:.2f} s, finish {res['finish_s']:.1f} s (bound 5 s); rows {parts}"
    )


def test_service_killed_the_rest_goes_to_a_fresh_offline_run_under_the_same_run_id(tmp_path):
    from vldm.eval.wandb_reader import run_info

    res, out = run_logger(tmp_path, "SIGKILL")
    assert not res["broken"] and "the job goes on in a fresh OFFLINE run under the same run id" in out, out[-3000:]
    files = sorted((tmp_path / "wandb_home" / "wandb").glob(f"offline-run-*-{res['run_id']}/run-*.wandb"))
    assert len(files) == 2, files
    parts = steps_in(files)
    assert [s for p in parts for s in p] == list(range(1, 9)), parts
    assert run_info(files[1])["id"] == res["run_id"]
    assert Path(res["files"][-1]) == files[1]  # the file named in the sync command is the fallback's
    print(f"\nMEASURED service SIGKILLed: rows per file {parts}, finish {res['finish_s']:.1f} s")


def test_service_hung_the_rest_goes_to_an_offline_run_and_no_wandb_core_is_left_running(tmp_path):
    """A SIGSTOPped service: log() still returns, finish is cut at wandb.finish_timeout_s, the service is ended
    (teardown, then SIGKILL), the rows it had not written go to the fallback run, and none is left running."""
    res, out = run_logger(tmp_path, "SIGSTOP")
    assert not res["broken"] and "finish did not return within 5 s" in out, out[-3000:]
    # finish_timeout_s, the teardown (call_timeout_s), the fallback's init (init_timeout_s) and its finish
    assert 5.0 <= res["finish_s"] < 5 + 3 + 20 + 5, res
    files = sorted((tmp_path / "wandb_home" / "wandb").glob(f"offline-run-*-{res['run_id']}/run-*.wandb"))
    parts = steps_in(files)
    assert [s for p in parts for s in p] == list(range(1, 9)), parts
    left = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and b"wandb-core" in (d / "cmdline").read_bytes():
                if str(tmp_path).encode() in (d / "environ").read_bytes():
                    left.append(int(d.name))
        except OSError:
            continue
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == []
    print(
        f"\nMEASURED service SIGSTOPped: rows per file {parts}, finish {res['finish_s']:.1f} s "
        "(5 s finish_timeout_s + up to 3 s teardown + the fallback's init, replay and finish)"
    )


def test_rows_older_than_replay_rows_are_named_as_a_gap_and_the_kept_ones_re_logged(tmp_path):
    """wandb.replay_rows=2: when the killed service had flushed no row, the rows beyond the 2 kept are only in
    metrics.jsonl, and the warning says how many; the kept rows and every later one are in the fallback run."""
    res, out = run_logger(tmp_path, "SIGKILL", "wandb.replay_rows=2")
    files = sorted((tmp_path / "wandb_home" / "wandb").glob(f"offline-run-*-{res['run_id']}/run-*.wandb"))
    parts = steps_in(files)
    if parts[0]:  # the service had flushed some rows before it died: no gap then
        assert [s for p in parts for s in p] == list(range(1, 9)), parts
        return
    # the failure shows at the first log() after the kill or a later one (the socket may take a row or two
    # first): the 2 rows before and including it are kept, every later one follows
    first = parts[1][0]
    assert parts[1] == list(range(first, 9)) and 3 <= first <= 7, parts
    assert f"{first - 1} older rows are only in logs/metrics.jsonl" in out, out[-3000:]
    print(f"\nMEASURED replay_rows=2: fallback rows {parts[1]}, rows 1-{first - 1} only in metrics.jsonl")
