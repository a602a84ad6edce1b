"""The configuration reference (``hlip-ray config --reference``, the guide's reference page), generated
from the config tree in ``hlip_ray/config.py``: one table per section, one row per key with its type,
default and docstring, then the named models."""

from __future__ import annotations

import json
import re
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from hlip_ray.config import Config, config_fields, is_section
from hlip_ray.named_models import NAMED_MODELS

# Constraint attributes of pydantic's field metadata (annotated_types' Gt, Ge, ...) and their signs.
_BOUNDS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}


def _type_name(annotation: Any, metadata: list[Any] = ()) -> str:
    """A field's type as a reader writes it: ``int > 0``, ``str | null``, ``list[int > 0] (3 items)``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0], [*args[1:], *metadata])
    constraints: list[str] = []
    low = high = None
    for item in metadata:
        for part in getattr(item, "metadata", [item]):   # Field(...) holds its constraints in .metadata
            for attribute, sign in _BOUNDS.items():
                if getattr(part, attribute, None) is not None:
                    constraints.append(f"{sign} {getattr(part, attribute)}")
            low = getattr(part, "min_length", None) or low
            high = getattr(part, "max_length", None) or high
    if origin is Literal:
        name = " | ".join(json.dumps(value) for value in args)
    elif origin in (Union, UnionType):
        name = " | ".join(_type_name(arg) for arg in args)
    elif origin is list:
        name = f"list[{_type_name(args[0])}]"
    elif annotation is type(None):
        name = "null"
    else:
        name = getattr(annotation, "__name__", str(annotation))
    if constraints:
        name = f"{name} {', '.join(constraints)}"
    if low is not None or high is not None:
        name += f" ({low} items)" if low == high else f" ({low or 0} to {high or 'any'} items)"
    return name


def _description(field: FieldInfo) -> str:
    """The field's docstring on one line, its pipes escaped outside code spans (Markdown tables)."""
    text = " ".join((field.description or "").split())
    parts = re.split(r"(``.+?``|`[^`]+`)", text)
    return "".join(part if part.startswith("`") else part.replace("|", "\\|") for part in parts)


def config_reference() -> str:
    """The configuration reference as Markdown, generated from the tree: one section per config section,
    one table row per key (dotted path, type, default, description from the field's docstring)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `hlip_ray/config.py` when the guide is built (`hlip-ray config --reference` prints",
        "the same page): every key, its type, default and meaning. `null` means unset (YAML's null, Python's",
        "None). `hlip-ray config` prints the defaults as YAML; [Configuration](../configuration.md) says how",
        "files and overrides combine.",
    ]
    sections = [("", Config)] + [(path, field.annotation) for path, field in config_fields()
                                 if is_section(field.annotation)]
    for path, section in sections:
        keys = [(f"{path}.{name}" if path else name, field) for name, field in section.model_fields.items()
                if not is_section(field.annotation)]
        if not keys:
            continue
        lines += ["", f"## `{path}`" if path else "## Top level", "", " ".join((section.__doc__ or "").split()), "",
                  "| key | type | default | description |", "| --- | --- | --- | --- |"]
        for key, field in keys:
            default = json.dumps(field.get_default(call_default_factory=True), ensure_ascii=False)
            lines.append(f"| `{key}` | `{_type_name(field.annotation, field.metadata)}` | `{default}` "
                         f"| {_description(field)} |")
    lines += ["", "## Named models", "", "`model.name: NAME` sets these keys (a key given beside it wins).", "",
              "| name | what | width x depth, heads | patch | grid | layout | slots | pooling |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in NAMED_MODELS.items():
        model = entry["model"]
        lines.append(f"| `{name}` | {entry['summary']} | {model['embed_dim']} x {model['depth']}, {model['num_heads']} "
                     f"| {'x'.join(map(str, model['patch_size']))} | {'x'.join(map(str, entry['grid']))} "
                     f"| `{model['attention_layout']}` | {model['max_scan_slots']} | `{model['pooling']}` |")
    return "\n".join(lines) + "\n"
