"""Random draws keyed on (study seed, purpose, block), independent of how a batch is cut.

The study encoder's random choices (scan-slot sampling, patch dropout, drop-path) come from a
generator made for each study and each purpose, seeded from the study's own seed. A study
therefore gets the same masks whether it is encoded alone, in a chunk of four, or on another
worker: the property the exact gradient cache relies on. The trainer derives a study's seed
from (run seed, step, study position); see ``study_seed``.
"""

from __future__ import annotations

import numpy as np
import torch

SLOTS = 1
PATCH_DROPOUT = 2
DROP_PATH = 3


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, well mixed (numpy's SeedSequence)."""
    words = np.random.SeedSequence([int(part) % (1 << 63) for part in parts]).generate_state(2, np.uint32)
    return (int(words[0]) << 31 | int(words[1]) >> 1) & ((1 << 63) - 1)


def study_seed(run_seed: int, step: int, study_index: int) -> int:
    """Seed of one study's random draws at one training step (``study_index``: global position)."""
    return mix_seed(run_seed, step, study_index)


def generator(seed: int, purpose: int, block: int = 0) -> torch.Generator:
    """A CPU generator for one study, one purpose and (for drop-path) one block."""
    gen = torch.Generator()
    gen.manual_seed(mix_seed(seed, purpose, block))
    return gen
