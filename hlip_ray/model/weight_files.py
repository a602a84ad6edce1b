"""Reading a state dict from a weights file, for the foreign-checkpoint adapters."""

from __future__ import annotations

from pathlib import Path

import torch


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a ``.safetensors`` file, or in a torch file (also under ``state_dict`` / ``model``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:   # safetensors' own errors: a truncated or foreign file
            raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:   # truncated, not a torch file, or a pickle holding more than tensors
        kind = type(error).__name__
        raise ValueError(f"{path}: not a torch weights file that loads safely (tensors only): {kind}; "
                         "a truncated download, another format, or a pickle with code in it") from None
    for key in ("state_dict", "model"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: no state dict inside")
    return payload
