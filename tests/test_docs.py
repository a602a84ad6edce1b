"""The user's guide (docs/, mkdocs): it builds with warnings as errors, its configuration reference
has every key of the config tree with a description, and the README's links into it resolve.

The guide is built once for the module, into a temporary folder.
"""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from pydantic import BaseModel

from hlip_ray.config import Config
from tests.conftest import REPO_ROOT

REFERENCE_PAGE = Path("reference") / "config" / "index.html"


@pytest.fixture(scope="module")
def built_guide(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """``mkdocs build --strict`` of the guide: the finished process and the site folder. Under --strict
    mkdocs writes every page before it gives up on warnings, so the pages are there either way."""
    site = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    return result, site


def config_keys(section: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every key of the config tree as a dotted path (``model.text.pooling``), sections left out."""
    keys = []
    for name, field in section.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += config_keys(field.annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


class TableRows(HTMLParser):
    """The text of every table row's cells in an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_the_guide_builds_with_warnings_as_errors(built_guide):
    result, _ = built_guide
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}{result.stderr}"


def test_every_config_key_is_in_the_generated_reference_with_a_description(built_guide):
    _, site = built_guide
    page = site / REFERENCE_PAGE
    assert page.is_file(), f"the configuration reference {REFERENCE_PAGE} was not built"
    parser = TableRows()
    parser.feed(page.read_text(encoding="utf-8"))
    # key | type | default | description
    described = {row[0]: row[3] for row in parser.rows if len(row) == 4 and row[0] != "key"}
    keys = config_keys()
    assert "model.text.pooling" in keys and "train.max_failures" in keys   # the walk reaches nested keys
    missing = [key for key in keys if key not in described]
    assert not missing, f"config keys missing from the generated reference: {missing}"
    empty = [key for key in keys if not described[key]]
    assert not empty, (f"config keys without a description (write a docstring under the field in "
                       f"hlip_ray/config.py): {empty}")
    assert all(described[key] != "None" for key in keys)


def test_the_readmes_links_into_the_guide_resolve():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    relative = [target for target in targets if not re.match(r"[a-z]+:|#", target)]
    assert any(target.startswith("docs/") for target in relative), "the README links to no page of the guide"
    broken = [target for target in relative if not (REPO_ROOT / target.split("#")[0]).exists()]
    assert not broken, f"README links to files that do not exist: {broken}"


UNFINISHED = re.compile(r"(?i)\bnot (?:built )?yet\b|\bopen issue\b|\bno job yet\b|\bcomes with .* issue #\d+")


def test_docs_say_what_blocks_anything_they_call_unfinished():
    """A page that calls something unfinished ("not yet", "open issue") says on that line what blocks it
    ("blocked: ..."); such words went stale as the work landed (the CT-RATE reader, the embed job)."""
    pages = [REPO_ROOT / "README.md", REPO_ROOT / "cluster" / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
    stale = [f"{page.relative_to(REPO_ROOT)}:{number}: {line.strip()[:120]}"
             for page in pages for number, line in enumerate(page.read_text().splitlines(), 1)
             if UNFINISHED.search(line) and "blocked:" not in line]
    assert not stale, "\n".join(stale)


def test_the_configuration_page_names_every_section_of_the_tree():
    opening = (REPO_ROOT / "docs" / "configuration.md").read_text().split("\n\n")[1]
    missing = [name for name in Config.model_fields if f"`{name}`" not in opening]
    assert not missing, f"docs/configuration.md's opening does not name the section(s) {missing}"


def test_every_command_and_flag_is_in_the_generated_cli_reference(built_guide):
    import argparse

    from hlip_ray.cli import build_parser

    _, site = built_guide
    page = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    parser = TableRows()
    parser.feed(page)
    rows = {row[0] for row in parser.rows}
    (commands,) = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    for name, command in commands.choices.items():
        assert f"hlip-ray {name}" in page, f"hlip-ray {name} is missing from the CLI reference"
        for action in command._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert ", ".join(action.option_strings) in rows, f"hlip-ray {name} {action.option_strings}"
    assert "(default: 24)" in page and "%(default)" not in page
