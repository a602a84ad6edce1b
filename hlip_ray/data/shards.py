"""The shard cache's layout: decode once, stream every epoch after.

``hlip-ray preprocess`` (``preprocess.py``) writes every usable study of a manifest as rows of
Parquet shards (``DIR/shards/*.parquet``): the study record of ``sources.py`` (uint8 volumes with
their shape, study id, report, modality, split, labels; no patient fields), one study per row
group, plus ``DIR/index.parquet`` (where each study is: file, row group, study id, split, labels),
``DIR/quarantine.jsonl`` and ``DIR/shards.json`` (counts and the preprocessing settings the
volumes were made with). Training and evaluation read the shards instead of raw files: a
study is one ranged read of its row group, so training can visit studies in any order.
"""

from __future__ import annotations

import io
from collections import OrderedDict

from hlip_ray.data.storage import Storage, join

SHARDS_DIR = "shards"
SUMMARY_FILE = "shards.json"
INDEX_FILE = "index.parquet"
INDEX_COLUMNS = ["study_id", "split", "labels", "modality"]
OPEN_FILES = 64  # shard files kept open per worker process


def write_index(out: str, storage: Storage) -> list[dict]:
    """Index every study of ``out/shards`` into ``out/index.parquet``; returns the index rows."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    filesystem, root = storage.resolve(join(out, SHARDS_DIR))
    rows = []
    for info in sorted(filesystem.get_file_info(pafs.FileSelector(root, recursive=True)), key=lambda i: i.path):
        if not info.path.endswith(".parquet"):
            continue
        name = info.path[len(root) + 1:]
        with filesystem.open_input_file(info.path) as handle:
            shard = pq.ParquetFile(handle)
            for group in range(shard.num_row_groups):
                columns = shard.read_row_group(group, columns=INDEX_COLUMNS).to_pylist()
                if len(columns) != 1:
                    raise ValueError(f"{info.path}: row group {group} holds {len(columns)} studies, not 1")
                rows.append({"file": name, "row_group": group, **columns[0]})
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    storage.write_bytes(join(out, INDEX_FILE), sink.getvalue())
    return rows


def read_index(out: str, storage: Storage) -> list[dict]:
    """The rows of ``out/index.parquet``: ``file``, ``row_group``, ``study_id``, ``split``, ``labels``, ``modality``."""
    import pyarrow.parquet as pq

    uri = join(out, INDEX_FILE)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no shard index (write the shards with `hlip-ray preprocess`)") from None
    return pq.read_table(io.BytesIO(data)).to_pylist()


_OPEN: OrderedDict = OrderedDict()


def read_study(out: str, file: str, row_group: int, storage: Storage) -> dict:
    """The study record in row group ``row_group`` of shard ``file`` (as named by the index)."""
    import pyarrow.parquet as pq

    key = (storage, out, file)
    shard = _OPEN.pop(key, None)
    if shard is None:
        filesystem, path = storage.resolve(join(out, SHARDS_DIR, file))
        shard = pq.ParquetFile(filesystem.open_input_file(path))
        while len(_OPEN) >= OPEN_FILES:
            _OPEN.popitem(last=False)[1].close()
    _OPEN[key] = shard
    (record,) = shard.read_row_group(row_group).to_pylist()
    return record

