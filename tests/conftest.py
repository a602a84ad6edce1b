"""Shared test set-up: tiny model configs, fixtures paths, offline Hugging Face."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No model hub here or in CI: everything loads from local files or packaged weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
HLIP_REFERENCE = Path(
    os.environ.get("HLIP_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "fixtures" / "hlip_reference")
)


@pytest.fixture(scope="session")
def hlip_reference() -> Path:
    """Golden outputs of HLIP's own encoder (see its README)."""
    if not (HLIP_REFERENCE / "cases.json").is_file():
        message = f"HLIP reference fixtures not found at {HLIP_REFERENCE} (set HLIP_REFERENCE_DIR)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return HLIP_REFERENCE
