"""mkdocs hook: the configuration reference page (``reference/config.md``), generated at build time
from the config tree in ``hlip_ray/config.py`` (``hlip_ray/config_reference.py``). Never written to ``docs/``."""

from __future__ import annotations

import importlib
import logging

from mkdocs.structure.files import File

PAGE = "reference/config.md"
log = logging.getLogger("mkdocs.hooks.config_reference")


def on_files(files, config):
    """Add the generated page; a key without a description is a warning (an error under --strict)."""
    # Reloaded at every build, so that `mkdocs serve` (which watches hlip_ray/config.py) shows edits.
    tree = importlib.reload(importlib.import_module("hlip_ray.config"))
    reference = importlib.reload(importlib.import_module("hlip_ray.config_reference"))
    for path, field in tree.config_fields():
        if not (field.description or "").strip():
            log.warning("config key %s has no description: write a docstring under it in hlip_ray/config.py", path)
    files.append(File.generated(config, PAGE, content=reference.config_reference()))
    return files
