"""Attention layouts: which level (slice, scan, study) each block of the study encoder attends at.

Plain Python, shared by the config (which validates) and the model (which runs them).
"""

from __future__ import annotations

# Named attention layouts: a pattern repeated to the model's depth.
NAMED_LAYOUTS: dict[str, tuple[str, ...]] = {
    "h2": ("scan", "scan", "study"),
    "h3": ("slice", "scan", "study"),
    "chest": ("slice", "slice", "study"),
    "full": ("study",),
}


def expand_layout(layout: str | list[str] | tuple[str, ...], depth: int) -> tuple[str, ...]:
    """Attention level of every block: a named layout repeated to ``depth``, or an explicit list.

    A string holding commas (``"scan,scan,study"``) is read as an explicit list.
    """
    if isinstance(layout, str):
        if layout in NAMED_LAYOUTS:
            pattern = NAMED_LAYOUTS[layout]
            if depth % len(pattern):
                raise ValueError(
                    f"layout {layout!r} repeats {','.join(pattern)} and needs a depth divisible "
                    f"by {len(pattern)}, got depth {depth}"
                )
            return pattern * (depth // len(pattern))
        if "," not in layout:
            raise ValueError(
                f"unknown attention layout {layout!r}; names: {', '.join(NAMED_LAYOUTS)}, "
                "or a list of slice/scan/study per block"
            )
        layout = [level.strip() for level in layout.split(",")]
    levels = tuple(layout)
    bad = [level for level in levels if level not in ("slice", "scan", "study")]
    if bad:
        raise ValueError(f"attention levels must be slice, scan or study, got {bad}")
    if len(levels) != depth:
        raise ValueError(f"layout lists {len(levels)} levels for a model of depth {depth}")
    return levels
