"""Spot instances, for real: `hlip-ray spot-watch` against an instance-metadata server on 127.0.0.1
(IMDSv2: token, then the paths), and a training run on a Ray cluster of several nodes
(`hlip_ray.demo.spot_drill`) through a reclaim with notice, a node coming back, a SIGKILLed worker and a
node lost without notice. The run ends with the weights of a run nothing happened to.
"""

from __future__ import annotations

import re
import time

import pytest

from hlip_ray import spot
from hlip_ray.demo.spot_drill import (
    LocalSpotCluster,
    MetadataServer,
    TrainingRun,
    drill_overrides,
    segments,
    write_drill_corpus,
)

MAX_STEPS = 80
CHECKPOINT_EVERY = 5
# Studies per step: steps slow enough that the 80 hold the four events however fast this machine takes
# them (at 4 studies a step, 0.3 s, the notice window and a node's return took every step left). More
# steps are no cure: at 100 the two runs' weights differed beyond the tolerance below (sums in another
# order at 1 worker add up over the steps).
GLOBAL_BATCH = 12
# The reclaim notice's lead: room for the notice's checkpoint and then at least one more step and checkpoint
# (a step and a checkpoint twice over, plus the 5 s margin). At 10 s a run that took the notice a few
# steps after it was given had no room left and rightly held at once, so the train-on path went untested.
NOTICE_S = 15


@pytest.fixture
def metadata():
    server = MetadataServer()
    yield server
    server.close()


def test_the_notice_is_read_through_an_imdsv2_session(metadata):
    reader = spot.InstanceMetadata(metadata.endpoint)
    assert spot.reclaim_notice(reader) is None and not spot.rebalance_recommended(reader)
    metadata.rebalance = True
    assert spot.rebalance_recommended(reader)
    metadata.announce(120)
    notice = spot.reclaim_notice(reader)
    assert notice.action == "terminate" and 115 <= notice.seconds_left <= 120
    assert metadata.unauthorized == 0
    reader.token = "expired"          # a stale token: one 401, a new token, the answer
    assert spot.reclaim_notice(reader).action == "terminate" and metadata.unauthorized == 1


def _model_weights(root, run_name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(root / "runs" / run_name / f"checkpoint_{MAX_STEPS:08d}" / "model.safetensors"))


def _checkpoint_steps(segment: list[dict]) -> list[int]:
    return [int(step["step"]) for step in segment if step["checkpoint"]]


@pytest.mark.slow
def test_a_run_through_reclaims_kills_and_lost_nodes_loses_no_step_to_a_notice_and_ends_as_an_uninterrupted_run(
        tmp_path):
    """Two trainer nodes, each with its metadata server and watcher. An uninterrupted 2-worker run, then
    the same run elastic over [1, 2] workers through four events:

    1. a reclaim notice for a node: its watcher drains it, the run checkpoints, trains on while a step
       and a checkpoint fit before the deadline, checkpoints and waits; the node goes at the deadline and
       the run goes on with 1 worker from that last checkpoint: no step lost;
    2. the node comes back: the run grows back to 2 workers;
    3. a worker SIGKILLed: the run restarts by itself from its latest checkpoint;
    4. a node removed without notice: the run goes on with 1 worker.

    After each event without notice, at most one checkpoint interval is redone. Every step's studies
    are the next of the data order, and the final weights are the uninterrupted run's.
    """
    root = write_drill_corpus(tmp_path, studies=16)
    cluster = LocalSpotCluster(trainer_nodes=2)
    try:
        common = [f"train.max_steps={MAX_STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.max_failures=2",
                  f"train.global_batch_size={GLOBAL_BATCH}"]
        reference = TrainingRun(cluster.address, drill_overrides(root, "reference", *common, "train.num_workers=2"),
                                root / "logs" / "reference").start()
        assert reference.finish(300) == 0, reference.output[-3000:]

        run = TrainingRun(cluster.address, drill_overrides(root, "elastic", *common),
                          root / "logs" / "elastic").start()
        run.wait_for(lambda steps: len(steps) >= 3, 180, "step 3")
        reclaimed = cluster.trainers[1]
        deadline = cluster.reclaim(reclaimed, NOTICE_S)
        assert "node drained" in cluster.watcher_output(reclaimed)
        time.sleep(max(0.0, deadline - time.time()))
        cluster.remove_node(reclaimed)                                                   # 1
        run.wait_for(lambda steps: steps[-1]["workers"] == 1, 180, "the run on 1 worker")
        cluster.add_trainer_node()                                                       # 2
        run.wait_for(lambda steps: len(segments(steps)) == 3, 180, "the run back on 2 workers")
        assert segments(run.steps())[2][0]["workers"] == 2
        run.wait_for(lambda steps: len(segments(steps)[-1]) >= 2, 60, "2 steps on 2 workers")
        assert cluster.kill_workers(cluster.trainers[0])                                 # 3
        run.wait_for(lambda steps: len(segments(steps)) == 4, 180, "a restart after the kill")
        run.wait_for(lambda steps: len(segments(steps)[-1]) >= 2, 60, "2 steps after the kill")
        cluster.remove_node(cluster.trainers[-1])                                        # 4
        assert run.finish(400) == 0, run.output[-3000:]
    finally:
        cluster.shutdown()

    parts = segments(run.steps())
    assert [part[0]["workers"] for part in parts] == [2, 1, 2, 2, 1], [(p[0]["step"], p[0]["workers"]) for p in parts]
    # 1: the notice's checkpoints, the last where the next group starts.
    notice_at = int(re.search(r"reclaim notice: .* (\d+) s left; checkpoint at step (\d+) now", run.output).group(2))
    assert notice_at in _checkpoint_steps(parts[0]) and "reclaim: the last step before the deadline" in run.output
    assert parts[0][-1]["checkpoint"] and parts[1][0]["step"] == parts[0][-1]["step"] + 1
    # 2-4: each restart from the latest checkpoint before it, at most one interval back.
    for before, after in zip(parts[1:], parts[2:]):
        resumed = int(after[0]["step"]) - 1
        assert resumed in _checkpoint_steps(before) or resumed == int(before[0]["step"]) - 1
        assert before[-1]["step"] - resumed <= CHECKPOINT_EVERY
    # Every step the run kept read the next studies of the data order.
    kept = {int(step["step"]): step for step in run.steps()}   # a redone step's last run is the one kept
    assert sorted(kept) == list(range(1, MAX_STEPS + 1))
    assert all(kept[s]["position"] == s * GLOBAL_BATCH and kept[s]["positions_in_order"] for s in kept)
    # The same weights as the run nothing happened to (fp32; sums in another order at 1 worker). The more
    # steps at 1 worker (a slow machine brings the node back late), the more that order shows: after 55 such
    # steps a qkv bias of 0.015 was 1.2e-6 off, every other weight under 4.3e-7.
    import torch

    expected, got = _model_weights(root, "reference"), _model_weights(root, "elastic")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=5e-6, msg=name)


def test_the_quarantine_log_keeps_its_records_when_its_actor_is_restarted(ray_session):
    """The quarantine log lives on the driver's node and Ray restarts it if it crashes; it takes up its
    records again from its spool."""
    import ray

    from hlip_ray.data.quarantine import create_quarantine_log

    log = create_quarantine_log()
    first = {"uri": "s3://b/s1/ct", "study_id": "s1", "reason": "unreadable", "detail": "truncated"}
    ray.get(log.record.remote([first]))
    pid = ray.get(log.__ray_call__.remote(lambda self: __import__("os").getpid()))
    ray.kill(log, no_restart=False)     # the actor's process dies; Ray starts it again
    second = {**first, "study_id": "s2", "uri": "s3://b/s2/ct"}
    ray.get(log.record.remote([second]))
    assert ray.get(log.__ray_call__.remote(lambda self: __import__("os").getpid())) != pid
    assert ray.get(log.records_list.remote()) == [first, second]
    ray.get(log.close.remote())
