"""How a batch's tokens group at each attention level, and the one primitive that regroups them.

Only real scans are ever tokenised. Their body tokens live in one canonical order,
``[S, U, t]`` flattened (S real scans in batch order, which groups them by study; U units per
scan: the token slices of depth ``pd`` when an attention layout has slice attention, else one unit holding
the whole scan; t tokens per unit after patch dropout). At every level a group's body tokens
form one contiguous run of that order:

- ``slice``: one unit (``t`` tokens), ``S * U`` groups;
- ``scan``:  one scan (``U * t`` tokens), ``S`` groups;
- ``study``: all real scans of one study, ``B`` groups of varying length.

Each group also owns ``P`` prefix (CLS) tokens. Blocks run on a *packed* sequence ``[T, E]``:
the groups one after another, each its prefix tokens then its body tokens. Study groups are
packed shortest first, so groups of equal length sit together and attention runs on dense
``[groups, length]`` buckets (or on the whole packed sequence with a varlen kernel).

``regroup`` moves a packed sequence from level A to level B: body tokens keep their place,
prefix tokens are averaged over the A groups that merge into one B group, or copied into
every B group that an A group splits into.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LEVELS = ("slice", "scan", "study")  # finest first


@dataclass(frozen=True)
class PackedSequences:
    """One level's packed sequence.

    ``pack_index[i]`` is the row of ``cat([prefix_flat, body_flat])`` that packed token ``i``
    holds. ``buckets`` lists ``(first_token, num_sequences, sequence_length)`` runs of
    equal-length sequences; ``cu_seqlens`` are the varlen boundaries.
    """

    num_groups: int
    pack_index: torch.Tensor  # [T] long
    unpack_index: torch.Tensor  # [T] long, inverse permutation of pack_index
    token_group: torch.Tensor  # [T] long, canonical group of each packed token
    buckets: tuple[tuple[int, int, int], ...]
    cu_seqlens: torch.Tensor  # [num_groups + 1] int32
    max_seqlen: int


class TokenGroups:
    """Grouping of one batch's tokens at every level; built once per forward pass.

    Args:
        scan_study: ``[S]`` long, the study (row of the batch) each real scan belongs to,
            non-decreasing.
        num_studies: B.
        units_per_scan: U.
        tokens_per_unit: t.
        num_prefix: P.
    """

    def __init__(
        self,
        scan_study: torch.Tensor,
        num_studies: int,
        units_per_scan: int,
        tokens_per_unit: int,
        num_prefix: int,
    ) -> None:
        self.scan_study = scan_study
        self.num_studies = num_studies
        self.num_scans = int(scan_study.numel())
        self.units_per_scan = units_per_scan
        self.tokens_per_unit = tokens_per_unit
        self.num_prefix = num_prefix
        self.device = scan_study.device
        self.scans_per_study = torch.bincount(scan_study, minlength=num_studies)
        self._packed: dict[str, PackedSequences] = {}

    # -- groups at each level, in canonical order ----------------------------------------
    def num_groups(self, level: str) -> int:
        return {
            "slice": self.num_scans * self.units_per_scan,
            "scan": self.num_scans,
            "study": self.num_studies,
        }[level]

    def group_study(self, level: str) -> torch.Tensor:
        """``[G]`` the study each group of ``level`` belongs to."""
        if level == "study":
            return torch.arange(self.num_studies, device=self.device)
        return self.scan_study if level == "scan" else self.scan_study.repeat_interleave(self.units_per_scan)

    def _unit_group(self, level: str) -> torch.Tensor:
        """``[S * U]`` the group of ``level`` that each unit belongs to."""
        units = torch.arange(self.num_scans * self.units_per_scan, device=self.device)
        if level == "slice":
            return units
        scans = units // self.units_per_scan
        return scans if level == "scan" else self.scan_study[scans]

    def _body_lengths(self, level: str) -> torch.Tensor:
        unit_tokens = self.tokens_per_unit
        if level == "slice":
            return torch.full((self.num_groups(level),), unit_tokens, device=self.device)
        if level == "scan":
            return torch.full((self.num_scans,), self.units_per_scan * unit_tokens, device=self.device)
        return self.scans_per_study * self.units_per_scan * unit_tokens

    # -- packed sequences -------------------------------------------------------------------
    def packed(self, level: str) -> PackedSequences:
        if level not in self._packed:
            self._packed[level] = self._pack(level)
        return self._packed[level]

    def _pack(self, level: str) -> PackedSequences:
        prefix = self.num_prefix
        groups = self.num_groups(level)
        body_lengths = self._body_lengths(level)
        body_starts = torch.cumsum(body_lengths, 0) - body_lengths
        # Pack groups shortest first (stable), so equal lengths are neighbours.
        order = torch.sort(body_lengths, stable=True).indices
        seq_lengths = prefix + body_lengths[order]
        total = int(seq_lengths.sum())
        packed_group = torch.repeat_interleave(torch.arange(groups, device=self.device), seq_lengths)
        seq_starts = torch.cumsum(seq_lengths, 0) - seq_lengths
        offset = torch.arange(total, device=self.device) - seq_starts[packed_group]
        group = order[packed_group]
        pack_index = torch.where(
            offset < prefix,
            group * prefix + offset,
            groups * prefix + body_starts[group] + offset - prefix,
        )
        unpack_index = torch.empty_like(pack_index)
        unpack_index[pack_index] = torch.arange(total, device=self.device)
        lengths = seq_lengths.tolist()
        buckets, first = [], 0
        for length in sorted(set(lengths)):
            count = lengths.count(length)
            buckets.append((first, count, length))
            first += count * length
        cu_seqlens = torch.zeros(groups + 1, dtype=torch.int32, device=self.device)
        cu_seqlens[1:] = torch.cumsum(seq_lengths, 0)
        return PackedSequences(
            num_groups=groups,
            pack_index=pack_index,
            unpack_index=unpack_index,
            token_group=group,
            buckets=tuple(buckets),
            cu_seqlens=cu_seqlens,
            max_seqlen=max(lengths),
        )

    def token_study(self, level: str) -> torch.Tensor:
        """``[T]`` the study of each packed token at ``level``."""
        return self.group_study(level)[self.packed(level).token_group]

    def pack(self, prefix: torch.Tensor, body: torch.Tensor, level: str) -> torch.Tensor:
        """``prefix [G, P, E]`` and ``body [S*U*t, E]`` -> packed ``[T, E]`` at ``level``."""
        rows = torch.cat([prefix.reshape(-1, prefix.shape[-1]), body], dim=0)
        return rows.index_select(0, self.packed(level).pack_index)

    def unpack(self, packed: torch.Tensor, level: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed ``[T, E]`` at ``level`` -> ``prefix [G, P, E]``, ``body [S*U*t, E]``."""
        rows = packed.index_select(0, self.packed(level).unpack_index)
        prefix_rows = self.num_groups(level) * self.num_prefix
        prefix = rows[:prefix_rows].reshape(self.num_groups(level), self.num_prefix, -1)
        return prefix, rows[prefix_rows:]

    def regroup(self, packed: torch.Tensor, source: str, target: str) -> torch.Tensor:
        """Move a packed sequence from level ``source`` to level ``target``.

        Merging into a coarser level averages the prefix tokens of the merged groups; splitting
        into a finer level copies a group's prefix tokens into each part.
        """
        if source == target:
            return packed
        prefix, body = self.unpack(packed, source)
        finer, coarser = sorted((source, target), key=LEVELS.index)
        # Parent (at the coarser level) of each group at the finer level.
        first_unit = torch.arange(self.num_groups(finer), device=self.device)
        if finer == "scan":
            first_unit = first_unit * self.units_per_scan
        parent = self._unit_group(coarser)[first_unit]
        if source == finer:  # merge: mean over the finer groups of each coarser group
            sums = prefix.new_zeros((self.num_groups(coarser), *prefix.shape[1:]))
            sums = sums.index_add(0, parent, prefix)
            counts = torch.bincount(parent, minlength=self.num_groups(coarser)).clamp(min=1)
            prefix = sums / counts.to(prefix.dtype).reshape(-1, 1, 1)
        else:  # split: copy each coarser group's prefix into its parts
            prefix = prefix.index_select(0, parent)
        return self.pack(prefix, body, target)
