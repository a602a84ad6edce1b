"""Where the model looks: per-scan relevance of a label for a study, and overlays of it.

A label's score for a study is the zero-shot score (``zeroshot.py``): the study embedding's
similarity to the label's positive class embedding minus its similarity to the negative one, that
is ``study_embedding · (positive - negative)``. Its relevance map is a token-wise Grad-CAM:

1. the study passes through the encoder once, with grad; the packed tokens entering one block (by
   default the first: the patch embeddings, where the whole image still lies in the scans' tokens
   and the CLS tokens hold no image yet) are captured as they are; the gradient reaches them through
   every later block, whatever its grouping (slice groups, a scan, the study). Any block but the
   last can be chosen; the last block's input reaches the study token only through a LayerNorm,
   which a token's own scale does not change, so gradient x input is ~0 there. (At a later block,
   what the CLS tokens gathered before it is left out of the map.)
2. the score's gradient with respect to those tokens, times the tokens, summed over channels and
   kept where positive (ReLU) gives one value per token: the first-order share of the score that
   token holds, where it raises the score;
3. each real scan's values, on its token grid ``(D/pd, H/ph, W/pw)``, are resized trilinearly to the
   voxels its patches cover (voxels past the last whole patch, which no token sees, get zero).

Padded scans get zero everywhere. Maps are in the score's units; figures scale them per study.
``relevance_figures`` draws, per study and label, the slices along D holding the most relevance of
each scan (axial where ``data.reorient_to_ras`` is on or the scan is axial): the image in grey, the
relevance as a translucent heat map. Figures hold no report text and no patient field.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SLICES_PER_SCAN = 3


def label_directions(classes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``class_embeddings`` (label -> ``[2, P]``, negative row first) -> label -> ``[P]`` positive - negative."""
    return {label: (pair[1] - pair[0]).float() for label, pair in classes.items()}


def relevance_maps(model, pixels: torch.Tensor, scan_mask: torch.Tensor, directions: dict[str, torch.Tensor],
                   block: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(maps, scores)``: label -> ``[B, K, D, H, W]`` float32 relevance (module docstring), and label -> ``[B]``
    the study's score ``study_embedding · direction``.

    Args:
        model: a ``StudyCLIP`` in eval mode.
        pixels: ``[B, K, C, D, H, W]``; scan_mask: ``[B, K]`` bool, true for a real scan.
        directions: label -> ``[P]``, e.g. ``label_directions(class_embeddings(...))``.
        block: the encoder block whose input tokens are explained (Python indexing), any but the last.
    """
    if model.training:
        raise ValueError("relevance maps need the model in eval mode (model.eval())")
    visual = model.visual
    depth = len(visual.blocks)
    if not -depth <= block < depth - 1 or block == -1:
        raise ValueError(f"relevance is taken at the input of a block of the encoder but its last (blocks 0 to "
                         f"{depth - 2} of {depth}), not block {block}")
    block = block % depth
    device = next(model.parameters()).device
    pixels, scan_mask = pixels.to(device), scan_mask.to(device=device, dtype=torch.bool)
    with torch.no_grad():   # the token grouping of this batch: the same the full pass below builds
        groups = visual.forward_tokens(pixels, scan_mask, num_blocks=0).groups
    captured: list[torch.Tensor] = []
    hook = visual.blocks[block].norm1.register_forward_pre_hook(lambda _module, inputs: captured.append(inputs[0]))
    checkpointing, visual.grad_checkpointing = visual.grad_checkpointing, False   # one pass, its graph kept
    # Float input in [0, 1] (as the encoder reads uint8) that requires grad: a graph even for frozen weights.
    inputs = (pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()).requires_grad_(True)
    try:
        with torch.enable_grad():
            study = model.encode_study(inputs, scan_mask).float()   # [B, P]
            tokens = captured[0]   # packed [T, E] at this block's level
            scores, maps = {}, {}
            for index, (label, direction) in enumerate(directions.items()):
                score = study @ direction.to(device=device, dtype=torch.float32)   # [B]
                # Studies do not attend to each other: the gradient of the sum is each study's own.
                (gradient,) = torch.autograd.grad(score.sum(), tokens, retain_graph=index < len(directions) - 1)
                contribution = (gradient.float() * tokens.detach().float()).sum(dim=-1, keepdim=True)   # [T, 1]
                _, body = groups.unpack(contribution.relu(), visual.attention_levels[block])
                maps[label] = _to_voxels(body, groups.num_scans, visual, scan_mask, pixels.shape[-3:])
                scores[label] = score.detach()
    finally:
        hook.remove()
        visual.grad_checkpointing = checkpointing
    return maps, scores


def _to_voxels(body: torch.Tensor, num_scans: int, visual, scan_mask: torch.Tensor,
               grid: Sequence[int]) -> torch.Tensor:
    """Body token values ``[S*d*h*w, 1]`` of the real scans -> ``[B, K, D, H, W]`` (zero on padding)."""
    patch = visual.patch_size
    token_grid = [size // step for size, step in zip(grid, patch)]
    per_scan = body.view(num_scans, 1, *token_grid)
    covered = [tokens * step for tokens, step in zip(token_grid, patch)]
    voxels = F.interpolate(per_scan, size=covered, mode="trilinear", align_corners=False)[:, 0]
    voxels = F.pad(voxels, [0, grid[2] - covered[2], 0, grid[1] - covered[1], 0, grid[0] - covered[0]])
    out = voxels.new_zeros((*scan_mask.shape, *grid))
    out[scan_mask] = voxels
    return out


def top_slices(relevance: torch.Tensor, count: int = SLICES_PER_SCAN) -> list[int]:
    """Indices of the ``count`` slices along D of one scan's ``[D, H, W]`` relevance holding the most of it,
    in slice order."""
    mass = relevance.flatten(1).sum(dim=1)
    return sorted(torch.topk(mass, min(count, len(mass))).indices.tolist())


def figure_name(study_id: str, label: str) -> str:
    """``<study id>_<label>.png``, with characters other than letters, digits, ``.``, ``-`` and ``_`` as ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{study_id}_{label}") + ".png"


def relevance_figures(model, pixels: torch.Tensor, scan_mask: torch.Tensor, classes: dict[str, torch.Tensor],
                      out_dir: str | Path, study_ids: Sequence[str]) -> list[Path]:
    """One PNG per study and label in ``out_dir`` (``figure_name``): for each real scan, its most relevant
    slices with the label's relevance over them. Returns the files written.

    ``pixels [B, K, C, D, H, W]`` and ``scan_mask [B, K]`` as in a study batch, ``study_ids`` its ``B``
    study IDs, ``classes`` the output of ``zeroshot.class_embeddings``. The model must be in eval mode.
    """
    if len(study_ids) != len(pixels):
        raise ValueError(f"{len(study_ids)} study IDs for a batch of {len(pixels)} studies")
    maps, scores = relevance_maps(model, pixels, scan_mask, label_directions(classes))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = pixels[:, :, 0].float().cpu()   # the first intensity window
    written = []
    for row, study_id in enumerate(study_ids):
        scans = torch.nonzero(scan_mask[row].cpu()).flatten().tolist()
        for label, relevance in maps.items():
            path = out / figure_name(study_id, label)
            _draw(images[row], relevance[row].cpu(), scans, f"{label}: score {float(scores[label][row]):+.3g}",
                  path)
            written.append(path)
    return written


def _draw(image: torch.Tensor, relevance: torch.Tensor, scans: list[int], title: str, path: Path) -> None:
    """Scans (rows) by their most relevant slices (columns): image ``[K, D, H, W]`` grey, relevance over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peak = float(relevance.max()) or 1.0
    figure, axes = plt.subplots(len(scans), SLICES_PER_SCAN, figsize=(2.6 * SLICES_PER_SCAN, 2.6 * len(scans)),
                                squeeze=False)
    for axis_row, scan in zip(axes, scans):
        slices = top_slices(relevance[scan])
        for axis in axis_row:
            axis.axis("off")
        for axis, index in zip(axis_row, slices):
            axis.imshow(image[scan, index].numpy(), cmap="gray")
            heat = relevance[scan, index].numpy()
            axis.imshow(np.ma.masked_less_equal(heat, 0.2 * peak), cmap="jet", alpha=0.4, vmin=0, vmax=peak)
            axis.set_title(f"scan {scan + 1}, slice {index + 1}/{image.shape[1]}", fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
