"""Benchmark of training on spot nodes: what reclaims, kills and lost nodes cost a run, on a real Ray
cluster of three nodes on this machine (``tests.spot_drill``: a head that decodes, two trainer
nodes, each with its instance-metadata server on 127.0.0.1 and its ``hlip-ray spot-watch``).

One elastic run (``train.num_workers=[1,2]``, tiny model, checkpoints every 5 steps on ``file://``
storage) goes through three reclaim notices (each: the notice, the node drained and removed at the
deadline, the run on 1 worker, the node back, the run on 2 again), then a SIGKILLed worker, then a node
removed without notice. Prints ONE JSON line on stdout (progress to stderr):

- ``notice_to_checkpoint_s``: from the notice served by the metadata server to the run's first
  checkpoint after it (each event; goal: well inside the notice).
- ``steps_lost_notice``: steps trained past the checkpoint the next worker group resumed from, per
  reclaim (goal 0).
- ``recovery_s_reclaim``: from the node's removal at the deadline to the first step after it.
- ``recovery_s_kill``: from the SIGKILL to the first step after it (goal <= 45 s).
- ``recovery_s_node``: from a node's removal without notice to the first step after it (goal <= 90 s).
- ``steps_lost_kill`` / ``steps_lost_node``: steps redone after those (at most a checkpoint interval).
- ``goodput``: time in the steps the run kept over wall time, from the first step to the last, over
  the part with the three reclaims (each notice ``--notice-s`` ahead; AWS gives 120 s).
- ``goodput_uninterrupted``: the same for a run with no event, for scale (Ray Train's own report
  cadence and the data pipeline cost it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

from tests.spot_drill import (  # noqa: E402
    DRILL_GLOBAL_BATCH,
    LocalSpotCluster,
    TrainingRun,
    drill_overrides,
    segments,
    write_drill_corpus,
)

CHECKPOINT_EVERY = 5
GOALS = {"recovery_s_kill": 45.0, "recovery_s_node": 90.0, "steps_lost_notice": 0}


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def first_step_after(run: TrainingRun, moment: float, what: str, timeout: float = 240) -> dict:
    """The first step of the first worker group that started after ``moment`` (the old group may log a
    step or two after it, before it notices the loss)."""
    def restarted(steps):
        return [part[0] for part in segments(steps) if part[0]["time"] > moment]

    return restarted(run.wait_for(restarted, timeout, what))[0]


def steps_lost(run: TrainingRun, moment: float) -> int:
    """Steps the worker group running at ``moment`` took past the step the next group resumed from."""
    after = first_step_after(run, moment, "a restart")
    parts = segments(run.steps())
    before = max((part for part in parts if part[0]["time"] <= moment), key=lambda part: part[0]["time"])
    return int(before[-1]["step"]) - int(after["resumed_from"])


def goodput(steps: list[dict], start: float, end: float) -> float:
    """Seconds of the kept steps that ended after ``start`` and by ``end`` (each step's last run; its time
    is global batch / rate) over the wall time between them."""
    kept: dict[int, dict] = {}
    for step in steps:
        if start < step["time"] <= end:
            kept[int(step["step"])] = step
    busy = sum(DRILL_GLOBAL_BATCH / step["studies_per_s"] for step in kept.values())
    return busy / (end - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notice-s", type=float, default=15.0, help="seconds of notice of each reclaim")
    parser.add_argument("--max-steps", type=int, default=400)
    args = parser.parse_args()

    root = write_drill_corpus(Path(tempfile.mkdtemp(prefix="bench-spot-")), studies=24)
    cluster = LocalSpotCluster(trainer_nodes=2)
    figures: dict = {"notice_s": args.notice_s, "checkpoint_every": CHECKPOINT_EVERY}
    try:
        common = [f"train.max_steps={args.max_steps}", f"train.checkpoint_every={CHECKPOINT_EVERY}",
                  "train.max_failures=5", "train.report_every=50"]
        log("uninterrupted run")
        plain = TrainingRun(cluster.address, drill_overrides(root, "plain", *common, "train.num_workers=2"),
                            root / "logs" / "plain").start()
        assert plain.finish(900) == 0, plain.output[-3000:]
        steps = plain.steps()
        figures["goodput_uninterrupted"] = round(goodput(steps, steps[0]["time"], steps[-1]["time"]), 3)

        run = TrainingRun(cluster.address, drill_overrides(root, "spot", *common), root / "logs" / "spot").start()
        run.wait_for(lambda steps: len(steps) >= 3, 300, "step 3")
        first = run.steps()[0]["time"]
        to_checkpoint, lost, recovery = [], [], []
        for event in range(3):
            trainer = cluster.trainers[-1]
            announced = time.time()
            deadline = cluster.reclaim(trainer, args.notice_s)
            def checkpointed(steps, since=announced):
                return [s["time"] for s in steps if s["checkpoint"] and s["time"] > since]

            to_checkpoint.append(checkpointed(run.wait_for(checkpointed, 60, "a checkpoint after the notice"))[0]
                                 - announced)
            time.sleep(max(0.0, deadline - time.time()))
            removed = time.time()
            cluster.remove_node(trainer)
            recovery.append(first_step_after(run, removed, "a step after the removal")["time"] - removed)
            lost.append(steps_lost(run, announced))
            log(f"reclaim {event + 1}: checkpoint {to_checkpoint[-1]:.1f} s after the notice, "
                f"{recovery[-1]:.0f} s to the next step, {lost[-1]} steps lost")
            added = time.time()
            cluster.add_trainer_node()
            run.wait_for(lambda steps, since=added: steps[-1]["workers"] == 2 and steps[-1]["time"] > since, 240,
                         "2 workers again")
        reclaims_end = run.steps()[-1]["time"]
        figures.update(notice_to_checkpoint_s=[round(s, 1) for s in to_checkpoint], steps_lost_notice=max(lost),
                       recovery_s_reclaim=[round(s, 1) for s in recovery],
                       goodput=round(goodput(run.steps(), first, reclaims_end), 3))

        run.wait_for(lambda steps: steps[-1]["time"] > reclaims_end + 1, 60, "steps on 2 workers")
        killed = time.time()
        assert cluster.kill_workers(cluster.trainers[0])
        figures["recovery_s_kill"] = round(first_step_after(run, killed, "a step after the kill")["time"] - killed, 1)
        figures["steps_lost_kill"] = steps_lost(run, killed)
        log(f"kill: {figures['recovery_s_kill']} s to the next step")

        run.wait_for(lambda steps: steps[-1]["time"] > killed + figures["recovery_s_kill"] + 1, 60, "steps")
        removed = time.time()
        cluster.remove_node(cluster.trainers[-1])
        figures["recovery_s_node"] = round(first_step_after(run, removed, "a step after the loss")["time"] - removed, 1)
        figures["steps_lost_node"] = steps_lost(run, removed)
        log(f"node lost: {figures['recovery_s_node']} s to the next step")
        assert run.finish(900) == 0, run.output[-3000:]
        kept = {int(step["step"]): step for step in run.steps()}
        figures["data_order_kept"] = all(kept[s]["position"] == s * DRILL_GLOBAL_BATCH and kept[s]["positions_in_order"]
                                         for s in kept)
        figures["worker_groups"] = len(segments(run.steps()))
    finally:
        cluster.shutdown()
    figures["goals_met"] = {name: figures[name] <= goal for name, goal in GOALS.items()}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
