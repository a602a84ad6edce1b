"""The shard cache's layout: decode once, stream every epoch after.

``hlip-ray preprocess`` (``preprocess.py``) writes every usable study of a manifest as rows of
Parquet shards (``DIR/shards/run-<time>-<id>/*.parquet``, a folder per run): the study record of
``sources.py`` (uint8 volumes with their shape, study id, report, modality, split, labels; no
patient fields), one study per row group, plus ``DIR/index.parquet`` (where each study is: file,
row group, study id, split, labels, and where its files were), ``DIR/quarantine.jsonl`` and
``DIR/shards.json`` (counts and the preprocessing settings the volumes were made with). Readers see
only what the index names: a run writes its shards first and the index last, so a run that stops
half-way leaves nothing a reader picks up. Training and evaluation read the shards instead of raw files: a study is one
ranged read of its row group, so training can visit studies in any order."""

from __future__ import annotations

import io
from collections import OrderedDict

from hlip_ray.storage import Storage, join

SHARDS_DIR = "shards"
SUMMARY_FILE = "shards.json"
INDEX_FILE = "index.parquet"
INDEX_COLUMNS = ["study_id", "split", "labels", "modality"]
SOURCE_COLUMN = "source"   # where the study's files were (``sources.study_source``); absent from older shards
OPEN_FILES = 64  # shard files kept open per worker process


def index_files(out: str, storage: Storage, files: list[str]) -> tuple[list[dict], list[tuple[str, str]]]:
    """``(index rows, damaged)`` of shard ``files`` (names under ``out/shards``): a row per study (row
    group), and ``(file, why)`` for each file that is not a whole Parquet file of study rows."""
    import pyarrow.parquet as pq

    filesystem, root = storage.resolve(join(out, SHARDS_DIR))
    rows, damaged = [], []
    for name in sorted(files):
        try:
            with filesystem.open_input_file(f"{root}/{name}") as handle:
                shard = pq.ParquetFile(handle)
                read = INDEX_COLUMNS + [SOURCE_COLUMN] * (SOURCE_COLUMN in shard.schema_arrow.names)
                found = []
                for group in range(shard.num_row_groups):
                    columns = shard.read_row_group(group, columns=read).to_pylist()
                    if len(columns) != 1:
                        raise ValueError(f"row group {group} holds {len(columns)} studies, not 1")
                    found.append({"file": name, "row_group": group, SOURCE_COLUMN: None, **columns[0]})
        except (OSError, ValueError, KeyError) as error:   # pyarrow's ArrowInvalid is a ValueError
            damaged.append((name, f"{type(error).__name__}: not a whole shard ({str(error)[:120]})"))
            continue
        rows += found
    return rows, damaged


def shard_files(out: str, storage: Storage) -> list[str]:
    """Every ``.parquet`` file under ``out/shards``, as names relative to it."""
    root = join(out, SHARDS_DIR)
    try:
        uris = storage.list_files(root)
    except FileNotFoundError:
        return []
    return [uri[len(root) + 1 :] for uri in uris if uri.endswith(".parquet")]


def write_index(out: str, storage: Storage, rows: list[dict]) -> None:
    """Write ``out/index.parquet``: what readers see of the shards (written last, it commits them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty = pa.schema([("file", pa.string()), ("row_group", pa.int64()), ("study_id", pa.string()),
                       ("split", pa.string()), ("modality", pa.string()), (SOURCE_COLUMN, pa.string())])
    rows = [{SOURCE_COLUMN: None, **row} for row in rows]   # an older index has none
    table = pa.Table.from_pylist(rows) if rows else empty.empty_table()
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes(join(out, INDEX_FILE), sink.getvalue())


def read_index(out: str, storage: Storage) -> list[dict]:
    """The rows of ``out/index.parquet``: ``file``, ``row_group``, ``study_id``, ``split``, ``labels``, ``modality``,
    ``source`` (None in an index written before sources were kept)."""
    import pyarrow.parquet as pq

    uri = join(out, INDEX_FILE)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no shard index (write the shards with `hlip-ray preprocess`)") from None
    return [{SOURCE_COLUMN: None, **row} for row in pq.read_table(io.BytesIO(data)).to_pylist()]


_OPEN: OrderedDict = OrderedDict()


def read_study(out: str, file: str, row_group: int, storage: Storage) -> dict:
    """The study record in row group ``row_group`` of shard ``file`` (as named by the index)."""
    import pyarrow.parquet as pq

    key = (storage, out, file)
    shard = _OPEN.pop(key, None)
    uri = join(out, SHARDS_DIR, file)
    try:
        if shard is None:
            filesystem, path = storage.resolve(uri)
            shard = pq.ParquetFile(filesystem.open_input_file(path))
            while len(_OPEN) >= OPEN_FILES:
                _OPEN.popitem(last=False)[1].close()
        (record,) = shard.read_row_group(row_group).to_pylist()
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: a shard the index names is missing (preprocess into a new folder)") from None
    except (OSError, ValueError) as error:   # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{uri}: damaged shard, row group {row_group} does not read ({type(error).__name__}); "
                         "preprocess into a new folder") from None
    _OPEN[key] = shard
    return record

