"""Text tower: a Hugging Face BERT-family encoder, CLS or mean pooling, linear projection (or none).

``name_or_path`` as in ``hlip_ray/text_source.py``: a hub name, a local folder or ``pkg:PACKAGE/SUBDIR``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from hlip_ray.text_source import quiet_transformers, resolve_text_source


def _auto_model(source: str, with_weights: bool):
    from transformers import AutoConfig, AutoModel

    quiet_transformers()
    config = AutoConfig.from_pretrained(source)
    # BERT-family models carry a pooler that CLS pooling of the last hidden state never uses.
    extra = {"add_pooling_layer": False} if config.model_type in ("bert", "roberta", "xlm-roberta") else {}
    if with_weights:
        return AutoModel.from_pretrained(source, **extra)
    return AutoModel.from_config(config, **extra)


POOLINGS = ("cls", "mean")
PROJECTIONS = ("linear", "none")


def check_projection(projection: str, projection_dim: int, hidden_size: int) -> None:
    """Without a projection the text embedding is the pooled state, so its size is the tower's."""
    if projection not in PROJECTIONS:
        raise ValueError(f"text projection must be one of {PROJECTIONS}, not {projection!r}")
    if projection == "none" and projection_dim != hidden_size:
        raise ValueError(f"model.projection_dim is {projection_dim}, but with model.text.projection=none it must "
                         f"be the text tower's hidden size, {hidden_size}")


class TextTower(nn.Module):
    """``input_ids, attention_mask [B, L]`` -> ``[B, projection_dim]`` (not normalised).

    ``pooling="cls"``: the CLS token of the last hidden state, through a bias-free linear
    projection (open_clip's ``HFTextEncoder`` with ``cls_last_hidden_state_pooler`` and a linear
    projection, as in HLIP). ``pooling="mean"``: the mean of the last hidden state over real
    tokens, the pooling sentence-transformers models (all-MiniLM-L6-v2) are trained with.
    A frozen tower keeps its transformer fixed, and in eval mode; the projection still trains.
    ``projection="none"``: the pooled state is the embedding (``projection_dim`` must be the
    transformer's hidden size), so a frozen tower keeps the embedding space it was trained for.
    """

    def __init__(
        self, transformer: nn.Module, projection_dim: int, frozen: bool = False, pooling: str = "cls",
        projection: str = "linear",
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"text pooling must be one of {POOLINGS}, not {pooling!r}")
        hidden = transformer.config.hidden_size
        check_projection(projection, projection_dim, hidden)
        self.transformer = transformer
        self.pooling = pooling
        if projection == "linear":
            self.proj = nn.Linear(hidden, projection_dim, bias=False)
            nn.init.normal_(self.proj.weight, std=hidden**-0.5)
        else:
            self.proj = nn.Identity()
        self.frozen = frozen
        self._cache: OrderedDict[bytes, torch.Tensor] | None = None
        self._cache_size = 0
        if frozen:
            self.transformer.requires_grad_(False)
            self.transformer.eval()

    @classmethod
    def from_name_or_path(
        cls, name_or_path: str, projection_dim: int, frozen: bool = False, with_weights: bool = True,
        pooling: str = "cls", projection: str = "linear",
    ) -> TextTower:
        """Build from a hub name, local folder or ``pkg:`` source; ``with_weights=False`` builds
        the architecture only (weights come from a checkpoint afterwards)."""
        source = resolve_text_source(name_or_path)
        return cls(_auto_model(source, with_weights), projection_dim, frozen, pooling, projection)

    def train(self, mode: bool = True) -> TextTower:
        super().train(mode)
        if self.frozen:
            self.transformer.eval()
        return self

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        if enabled:
            self.transformer.gradient_checkpointing_enable()
        else:
            self.transformer.gradient_checkpointing_disable()

    def cache_pooled(self, max_entries: int) -> None:
        """Memoise a frozen transformer's output per token sequence (a report seen again costs nothing).

        Only for a frozen tower, and not where parameters are partitioned across workers (ZeRO-3:
        every worker must run the same forwards).
        """
        if not self.frozen:
            raise ValueError("only a frozen text tower's output can be cached")
        self._cache, self._cache_size = OrderedDict(), max_entries

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, hidden]``: the pooled last hidden state, before the projection."""
        if self._cache is None:
            return self._pool(input_ids, attention_mask)
        keys = [ids[mask.bool()].cpu().numpy().tobytes() for ids, mask in zip(input_ids, attention_mask)]
        missing = [row for row, key in enumerate(keys) if key not in self._cache]
        if missing:
            with torch.no_grad():
                fresh = self._pool(input_ids[missing], attention_mask[missing])
            for row, value in zip(missing, fresh):
                self._cache[keys[row]] = value
        for key in keys:
            self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return torch.stack([self._cache[key] for key in keys])

    def _pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pooled(input_ids, attention_mask))
