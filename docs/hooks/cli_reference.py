"""mkdocs hook: the command-line reference page (``reference/cli.md``), generated at build time from the
parser in ``hlip_ray/cli.py`` (``cli_reference``), so the guide and the command line cannot drift. Never
written to ``docs/``."""

from __future__ import annotations

import importlib

from mkdocs.structure.files import File

PAGE = "reference/cli.md"


def on_files(files, config):
    """Add the generated page."""
    # Reloaded at every build, so that `mkdocs serve` shows edits to the command line.
    cli = importlib.reload(importlib.import_module("hlip_ray.cli"))
    files.append(File.generated(config, PAGE, content=cli.cli_reference()))
    return files
