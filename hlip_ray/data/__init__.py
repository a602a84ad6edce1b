"""The study data plane, read top-down:

- ``storage.py``: local paths and ``s3://`` URIs; ``manifest.py``: which studies there are;
- ``decode.py`` (DICOM, NIfTI) -> ``records.py`` -> ``volume.py`` (HLIP's volume recipe);
- ``sources.py``: an item (manifest row, shard index row) -> a study record; ``quarantine.py``:
  what was skipped and why; ``order.py``: the training data order;
- ``streams.py``: Ray Data streams of training and evaluation examples, and their collate;
- ``shards.py`` (the shard cache's layout) and ``preprocess.py`` (``hlip-ray preprocess`` writes it).

Imports neither the model nor the trainer.
"""
