"""The training data order: a permutation per (seed, epoch), global positions, resumable streams;
and a decode task reading its next study ahead."""

from __future__ import annotations

import json
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hlip_ray.config import load_config
from hlip_ray.data.order import DataOrder
from hlip_ray.data.shards import INDEX_FILE
from hlip_ray.data.sources import ReadAhead, study_items
from hlip_ray.data.streams import collate_study_batch, training_stream
from hlip_ray.storage import Storage


class TinyStudies:
    """A study source without files: item -> one study record of 1-2 scans of constant pixels."""

    drops_studies = False  # so the stream keeps its blocks of positions as they are (as with shards)

    def read(self, item: dict, epoch: int = 0) -> None:
        return None

    def build(self, item: dict, epoch: int, read: None) -> list[dict]:
        scans = 1 + item["index"] % 2
        pixels = np.full((scans, 1, 8, 16, 16), item["index"], dtype=np.uint8)
        return [{"study_id": item["study_id"], "report": f"Study {item['index']}. No acute infarct.",
                 "modality": "CT", "split": "train", "labels": json.dumps({}), "pixels": pixels.tobytes(),
                 "shape": list(pixels.shape), "epoch": epoch}]


def test_every_epoch_visits_every_study_once_in_its_own_order():
    order = DataOrder(7, seed=3)
    epochs = [[order.locate(position) for position in range(epoch * 7, epoch * 7 + 7)] for epoch in range(3)]
    for epoch, located in enumerate(epochs):
        assert {e for e, _ in located} == {epoch}
        assert sorted(index for _, index in located) == list(range(7))
    assert [i for _, i in epochs[0]] != [i for _, i in epochs[1]]
    assert [DataOrder(7, seed=3).locate(p) for p in range(21)] == [pair for epoch in epochs for pair in epoch]
    assert [DataOrder(7, seed=4).locate(p) for p in range(7)] != epochs[0]


def test_a_training_stream_starts_at_any_position_and_keeps_the_order(ray_session):
    items = [{"study_id": f"s{i}", "index": i} for i in range(5)]
    config = load_config(None, ["data.grid=[8,16,16]", "data.scans_per_study=2", "data.windows=[[0,80]]",
                                "model.text.context_length=16", "train.chunk_size=2", "train.num_workers=1",
                                "train.global_batch_size=4", "resources.data=data_pool"])
    order = DataOrder(5, seed=config.train.seed)
    stream = training_stream(items, TinyStudies(), config, start=3, stop=13)
    batches = list(stream.iter_torch_batches(batch_size=4, collate_fn=collate_study_batch))
    positions = [int(p) for batch in batches for p in batch["position"]]
    assert positions == list(range(3, 13))
    studies = [study for batch in batches for study in batch["study_id"]]
    assert studies == [f"s{order.locate(p)[1]}" for p in positions]
    first = batches[0]
    assert first["pixels"].shape == (4, 2, 1, 8, 16, 16) and first["input_ids"].shape == (4, 16)
    for pixels, mask, study in zip(first["pixels"], first["scan_mask"], first["study_id"]):
        index = int(study[1:])
        assert int(mask.sum()) == 1 + index % 2 and int(pixels[0].float().mean()) == index
    # blocks of exactly train.chunk_size examples, so Ray Train's split deals them out in turn
    assert [len(block["position"]) for block in stream.iter_batches(batch_size=None)] == [2, 2, 2, 2, 2]


def test_the_order_permutes_studies_by_id_whatever_the_order_the_shard_index_lists_them(tmp_path):
    """Shard files are indexed in the order they were written, which differs between two
    preprocessings of the same manifest; the studies at each position must not."""
    ids = [f"study-{i:02d}" for i in range(12)]
    located = []
    for listed in (ids, ids[4:8] + ids[:4] + ids[8:][::-1]):
        shards = tmp_path / f"shards-{len(located)}"
        shards.mkdir()
        rows = [{"file": f"{k:03d}.parquet", "row_group": 0, "study_id": study, "split": "train",
                 "labels": "{}", "modality": "CT"} for k, study in enumerate(listed)]
        pq.write_table(pa.Table.from_pylist(rows), shards / INDEX_FILE)
        config = load_config(None, [f"data.shards={shards}"])
        items, _ = study_items(config, Storage(), None, "train", train=True)
        order = DataOrder(len(items), seed=config.train.seed)
        located.append([items[order.locate(position)[1]]["study_id"] for position in range(24)])
    assert located[0] == located[1]
    assert sorted(located[0][:12]) == ids


class SlowReads:
    """A source whose build of item ``i`` notes whether item ``i + 1`` was being read meanwhile."""

    def __init__(self) -> None:
        self.started = {}
        self.reads = []

    def read(self, item: dict, epoch: int = 0) -> int:
        self.reads.append(item["index"])
        self.started.setdefault(item["index"], threading.Event()).set()
        return item["index"] * 10

    def build(self, item: dict, epoch: int, read: int) -> list[dict]:
        following = self.started.setdefault(item["index"] + 1, threading.Event())
        return [{"index": item["index"], "read": read, "next_read_meanwhile": following.wait(timeout=2)}]


def test_a_decode_task_reads_the_next_study_while_it_builds_the_current_one():
    source = SlowReads()
    block = pa.Table.from_pylist([{"index": i} for i in range(4)])
    records = [row for table in ReadAhead(source)(block) for row in table.to_pylist()]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert [r["read"] for r in records] == [0, 10, 20, 30]
    assert [r["next_read_meanwhile"] for r in records] == [True, True, True, False]   # nothing follows 3
    assert source.reads == [0, 1, 2, 3]   # each item read once
