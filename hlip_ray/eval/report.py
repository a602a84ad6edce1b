"""``hlip-ray eval``'s report for people: a Markdown summary of the figures and ROC curves.

``markdown(report)`` is the table printed on the console (and ``report.md``); ``write_report`` writes
``report.json``, ``report.md`` and ``roc_curves.png`` (one panel per label: the zero-shot curve with its
AUC and confidence interval, the mean-intensity baseline's, chance) into a folder or ``s3://`` prefix.
Only figures go in: no report text and no patient field.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence

import numpy as np

from hlip_ray.storage import Storage, join

ROC_FIGURE = "roc_curves.png"


def _figure(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def _interval(ci: dict | None) -> str:
    if not ci or not math.isfinite(ci["low"]):
        return "–"
    return f"{ci['low']:.3f}–{ci['high']:.3f}"


def _few_shot_lines(few_shot: dict | None, labels: list[str]) -> list[str]:
    """The few-shot probe as a table: one row per label (and macro), one column per k, mean and interval."""
    if not few_shot or not few_shot["per_k"]:
        return []
    ks = list(few_shot["per_k"])
    lines = ["| few-shot probe AUC | " + " | ".join(f"k = {k}" for k in ks) + " |", "| --- |" + " --- |" * len(ks)]

    def cell(spread: dict | None) -> str:
        if not spread or not math.isfinite(spread["mean"]):
            return "–"
        return f"{spread['mean']:.3f} ({spread['low']:.3f}–{spread['high']:.3f})"

    for label in labels:
        cells = [cell(few_shot["per_k"][k]["per_label"].get(label)) for k in ks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| **macro** | " + " | ".join(cell(few_shot["per_k"][k]["macro"]) for k in ks) + " |")
    lines += ["", f"Few-shot probe: logistic regression on k studies of each class drawn at random, AUC on the "
                  f"label's other studies; mean and {round(few_shot['level'] * 100)}% range of {few_shot['draws']} "
                  f"draws (seed {few_shot['seed']})."]
    for k in ks:
        for label, reason in few_shot["per_k"][k]["skipped"].items():
            lines.append(f"- {label} skipped (k = {k}): {reason}")
    return lines + [""]


def markdown(report: dict) -> str:
    """The report's figures as Markdown: per-label table (zero-shot AUC and interval, baseline, threshold,
    balanced accuracy, F1, probe AUC), the macro row, then loss and retrieval."""
    where = f" of `{report['checkpoint']}`" if report.get("checkpoint") else ""
    lines = [f"## hlip-ray eval{where}: split `{report['split']}`, {report['studies']} studies", ""]
    per_label = report.get("per_label", {})
    if per_label:
        ci = report.get("auc_ci", {})
        classification = report.get("classification", {})
        probe = report.get("linear_probe", {})
        thresholds = classification.get("threshold", {}).get("per_label", {})
        lines += ["| label | zero-shot AUC | 95% CI | baseline AUC | threshold | balanced accuracy | F1 | probe AUC |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for label, auc in per_label.items():
            scored = classification.get("per_label", {}).get(label, {})
            lines.append(
                f"| {label} | {_figure(auc)} | {_interval(ci.get('per_label', {}).get(label))} | "
                f"{_figure(report['baseline']['per_label'].get(label))} | {_figure(thresholds.get(label), 4)} | "
                f"{_figure(scored.get('balanced_accuracy'))} | {_figure(scored.get('f1'))} | "
                f"{_figure(probe.get('per_label', {}).get(label))} |")
        lines.append(
            f"| **macro** | {_figure(report['macro_auc'])} | {_interval(ci.get('macro'))} | "
            f"{_figure(report['baseline']['macro_auc'])} | | {_figure(classification.get('macro_balanced_accuracy'))} "
            f"| {_figure(classification.get('macro_f1'))} | {_figure(probe.get('macro_auc'))} |")
        lines.append("")
        if ci:
            lines.append(f"95% CI: bootstrap over studies, {ci['samples']} resamples (seed {ci['seed']}).")
        if classification:
            lines.append(f"Thresholds: Youden point of each label's ROC on split "
                         f"`{classification['threshold']['chosen_on']}`.")
        if probe:
            lines.append(f"Linear probe: logistic regression on the frozen study embeddings, "
                         f"{probe['folds']}-fold stratified cross-validation.")
        for part in (classification, probe):
            for label, reason in part.get("skipped", {}).items():
                lines.append(f"- {label} skipped ({'probe' if part is probe else 'threshold'}): {reason}")
        lines.append("")
        lines += _few_shot_lines(report.get("few_shot"), list(per_label))
    retrieval = report.get("retrieval", {})
    lines.append(f"Contrastive loss {_figure(report['loss'], 4)}.")
    if retrieval:
        ks = [name.split("@")[1] for name in retrieval if name.startswith("r@")]
        lines += ["", "| retrieval | " + " | ".join(f"R@{k}" for k in ks) + " |",
                  "| --- |" + " --- |" * len(ks)]
        for way, title in (("study_to_report_", "study → report"), ("report_to_study_", "report → study"),
                           ("", "mean")):
            lines.append(f"| {title} | " + " | ".join(_figure(retrieval[f"{way}r@{k}"]) for k in ks) + " |")
    skipped = report.get("skipped")
    if skipped:
        reasons = ", ".join(f"{reason} {count}" for reason, count in skipped["by_reason"].items())
        where = f" (each with its reason in `{skipped['quarantine']}`)" if skipped.get("quarantine") else ""
        lines += ["", f"Skipped studies and scans, by reason: {reasons}{where}."]
    return "\n".join(lines) + "\n"


def roc_figure(report: dict, scores: dict[str, np.ndarray], baseline: np.ndarray, labels: np.ndarray,
               names: Sequence[str]) -> bytes:
    """A PNG of one ROC panel per label with both classes: the zero-shot ``scores`` (AUC and interval in the
    legend) and the ``baseline [N]`` scores, over the studies that carry the label (``labels [N, L]``)."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    columns = min(3, max(1, len(names)))
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(4 * columns, 4 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    ci = report.get("auc_ci", {}).get("per_label", {})
    for axis, (column, label) in zip(axes, enumerate(names)):
        keep = labels[:, column] >= 0
        values = labels[keep, column]
        axis.plot([0, 1], [0, 1], color="0.7", linestyle=":", label="chance")
        if 0 < values.sum() < len(values):
            interval = f", 95% CI {_interval(ci[label])}" if label in ci else ""
            fpr, tpr, _ = roc_curve(values, scores[label][keep])
            axis.plot(fpr, tpr, label=f"zero-shot AUC {_figure(report['per_label'][label])}{interval}")
            fpr, tpr, _ = roc_curve(values, baseline[keep])
            axis.plot(fpr, tpr, linestyle="--",
                      label=f"mean intensity AUC {_figure(report['baseline']['per_label'][label])}")
        else:
            axis.text(0.5, 0.5, "one class only: no curve", ha="center")
        axis.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1))
        axis.set_title(f"{label} ({int(keep.sum())} studies)", loc="left")
        axis.legend(loc="lower right", fontsize=8)
    for axis in axes[len(names):]:
        axis.set_visible(False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_report(out: str, report: dict, storage: Storage, roc_png: bytes | None = None) -> list[str]:
    """``report.json``, ``report.md`` and (given) the ROC figure into ``out``; returns the URIs written."""
    files = {"report.json": (json.dumps(report, indent=2) + "\n").encode(), "report.md": markdown(report).encode()}
    if roc_png is not None:
        files[ROC_FIGURE] = roc_png
    written = []
    for name, data in files.items():
        storage.write_bytes(join(out, name), data)
        written.append(join(out, name))
    return written
