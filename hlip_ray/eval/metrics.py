"""The figures of ``hlip-ray eval`` beyond the validation's: bootstrap confidence intervals of the AUCs,
balanced accuracy and F1 at a chosen threshold, and a linear probe. Every metric is scikit-learn's.

Inputs are per study: ``scores`` maps a label to ``[N]`` scores (higher: more likely positive) and
``labels`` is ``[N, L]`` (the label names' order; 1 positive, 0 negative, -1 where a study lacks the
label, as ``zeroshot.label_matrix`` writes it). A label is measured over the studies that carry it.

- **Bootstrap intervals**: the studies are resampled with replacement ``samples`` times (a fixed
  seed); every label is scored on the same resample, so the macro interval is of the macro mean. A
  resample in which a label has one class only is skipped for that label, and for the macro mean.
  The interval is the 2.5th to 97.5th percentile of the resamples' AUCs.
- **Classification** at each label's Youden point (the ROC's largest TPR - FPR, from ``roc_curve``),
  chosen on the scores of one split and applied to another's (or the same split's: optimistic).
- **Linear probe**: logistic regression on frozen study embeddings, its AUC cross-validated over
  stratified folds; a label with fewer positives or negatives than folds is skipped with the reason.
- **Few-shot probe**: the same regression trained on k positive and k negative studies drawn at random
  (a fixed seed), its AUC measured on the label's other studies; repeated ``draws`` times for each k, the
  mean and the 2.5th to 97.5th percentile of the draws reported (the spread a user labelling k studies
  per class can expect). A label with no more than k studies of one class is skipped for that k.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

LEVEL = 0.95
"""Coverage of the bootstrap intervals."""
SEED = 0
"""Seed of the bootstrap resamples and of the probe's folds: the same inputs give the same figures."""


def _labelled(labels: np.ndarray, column: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the studies that carry label ``column``, and their 0/1 values."""
    keep = np.flatnonzero(labels[:, column] >= 0)
    return keep, labels[keep, column].astype(int)


def _both_classes(values: np.ndarray) -> bool:
    return 0 < int(values.sum()) < len(values)


def _counts(values: np.ndarray) -> str:
    positives = int(values.sum())
    return f"{positives} positive and {len(values) - positives} negative studies"


def bootstrap_auc(scores: dict[str, np.ndarray], labels: np.ndarray, names: Sequence[str], samples: int,
                  seed: int = SEED, on_resample: Callable[[int], None] | None = None) -> dict:
    """95% bootstrap intervals of per-label and macro ROC AUC (module docstring).

    Returns ``{"level", "samples", "seed", "per_label": {label: {"low", "high", "resamples"}}, "macro":
    {...}}``; ``resamples`` counts the resamples an interval is made of. Labels without a point AUC (one
    class in the set) have no interval and stay out of the macro mean, as in ``zeroshot.auc_report``.
    ``on_resample(done)`` is called after each resample (progress).
    """
    from sklearn.metrics import roc_auc_score

    measured = [(column, name) for column, name in enumerate(names) if _both_classes(_labelled(labels, column)[1])]
    rng = np.random.default_rng(seed)
    aucs: dict[str, list[float]] = {name: [] for _, name in measured}
    macro: list[float] = []
    for done in range(samples):
        drawn = rng.integers(0, len(labels), size=len(labels))   # one resample of the studies for every label
        resample_aucs = []
        for column, name in measured:
            picked = drawn[labels[drawn, column] >= 0]   # the resample's studies that carry the label (repeats kept)
            values = labels[picked, column].astype(int)
            if not _both_classes(values):
                continue
            auc = float(roc_auc_score(values, scores[name][picked]))
            aucs[name].append(auc)
            resample_aucs.append(auc)
        if measured and len(resample_aucs) == len(measured):
            macro.append(float(np.mean(resample_aucs)))
        if on_resample is not None:
            on_resample(done + 1)
    return {"level": LEVEL, "samples": samples, "seed": seed,
            "per_label": {name: _interval(values) for name, values in aucs.items()}, "macro": _interval(macro)}


def _interval(values: list[float]) -> dict:
    tail = (1 - LEVEL) / 2 * 100
    if not values:
        return {"low": math.nan, "high": math.nan, "resamples": 0}
    low, high = np.percentile(values, [tail, 100 - tail])
    return {"low": float(low), "high": float(high), "resamples": len(values)}


def youden_threshold(scores: np.ndarray, values: np.ndarray) -> float:
    """The score at the ROC's Youden point (the largest TPR - FPR; the first of ties): a study scoring at
    least it is called positive. ``values`` must hold both classes."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(values, scores)
    # thresholds[0] is +inf (nothing called positive, J = 0): a finite point is always as good or better
    best = 1 + int(np.argmax((tpr - fpr)[1:]))
    return float(thresholds[best])


def classification_report(scores: dict[str, np.ndarray], labels: np.ndarray, names: Sequence[str],
                          threshold_scores: dict[str, np.ndarray], threshold_labels: np.ndarray,
                          chosen_on: str) -> dict:
    """Balanced accuracy and F1 of every label at its Youden threshold, the threshold chosen on
    ``threshold_scores``/``threshold_labels`` (the split ``chosen_on``) and applied to ``scores``/``labels``.

    Returns ``{"threshold": {"chosen_on", "rule": "youden", "per_label": {label: threshold}}, "per_label":
    {label: {"balanced_accuracy", "f1"}}, "macro_balanced_accuracy", "macro_f1", "skipped": {label:
    reason}}``; a label whose studies on either split are of one class is skipped.
    """
    from sklearn.metrics import balanced_accuracy_score, f1_score

    thresholds, per_label, skipped = {}, {}, {}
    for column, name in enumerate(names):
        chosen_keep, chosen_values = _labelled(threshold_labels, column)
        if not _both_classes(chosen_values):
            skipped[name] = f"no threshold: split {chosen_on!r} has {_counts(chosen_values)}"
            continue
        threshold = youden_threshold(threshold_scores[name][chosen_keep], chosen_values)
        thresholds[name] = threshold
        keep, values = _labelled(labels, column)
        if not _both_classes(values):
            skipped[name] = f"the evaluated studies are {_counts(values)}"
            continue
        predicted = (scores[name][keep] >= threshold).astype(int)
        per_label[name] = {"balanced_accuracy": float(balanced_accuracy_score(values, predicted)),
                           "f1": float(f1_score(values, predicted))}
    return {
        "threshold": {"chosen_on": chosen_on, "rule": "youden", "per_label": thresholds},
        "per_label": per_label,
        "macro_balanced_accuracy": _mean([value["balanced_accuracy"] for value in per_label.values()]),
        "macro_f1": _mean([value["f1"] for value in per_label.values()]),
        "skipped": skipped,
    }


def linear_probe(embeddings: np.ndarray, labels: np.ndarray, names: Sequence[str], folds: int,
                 seed: int = SEED) -> dict:
    """Cross-validated ROC AUC of a logistic regression (on standardised features) per label, trained on the
    frozen ``embeddings [N, P]`` of the studies that carry the label; the mean over ``folds`` stratified
    folds (shuffled with ``seed``).

    Returns ``{"folds", "per_label": {label: auc}, "macro_auc", "skipped": {label: reason}}``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.asarray(embeddings, dtype=np.float64)
    per_label, skipped = {}, {}
    for column, name in enumerate(names):
        keep, values = _labelled(labels, column)
        smaller = min(int(values.sum()), len(values) - int(values.sum()))
        if smaller < folds:
            skipped[name] = f"{_counts(values)}: fewer than eval.probe_folds ({folds}) of one class"
            continue
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        per_label[name] = float(np.mean(cross_val_score(probe, features[keep], values, cv=splits,
                                                        scoring="roc_auc")))
    return {"folds": folds, "per_label": per_label, "macro_auc": _mean(list(per_label.values())),
            "skipped": skipped}


def few_shot_probe(embeddings: np.ndarray, labels: np.ndarray, names: Sequence[str], shots: Sequence[int],
                   draws: int, seed: int = SEED) -> dict:
    """AUC of a logistic regression (standardised features) trained on ``k`` studies of each class, for each
    ``k`` in ``shots``, over ``draws`` random draws (``seed``): per label and macro (the mean over labels
    within a draw), each ``{"mean", "low", "high"}`` over the draws.

    Returns ``{"draws", "seed", "level", "per_k": {k: {"per_label", "macro", "skipped"}}}``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.asarray(embeddings, dtype=np.float64)
    per_k = {}
    for k in shots:
        rng = np.random.default_rng([seed, k])
        aucs: dict[str, list[float]] = {}
        skipped = {}
        for column, name in enumerate(names):
            keep, values = _labelled(labels, column)
            positives, negatives = keep[values == 1], keep[values == 0]
            if min(len(positives), len(negatives)) <= k:
                skipped[name] = f"{_counts(values)}: needs more than {k} of each class"
                continue
            aucs[name] = []
            for _ in range(draws):
                train = np.concatenate([rng.choice(positives, k, replace=False),
                                        rng.choice(negatives, k, replace=False)])
                test = np.setdiff1d(keep, train)
                probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
                probe.fit(features[train], labels[train, column].astype(int))
                aucs[name].append(float(roc_auc_score(labels[test, column].astype(int),
                                                      probe.decision_function(features[test]))))
        macro = np.mean(list(aucs.values()), axis=0).tolist() if aucs else []
        per_k[k] = {"per_label": {name: _spread(values) for name, values in aucs.items()},
                    "macro": _spread(macro), "skipped": skipped}
    return {"draws": draws, "seed": seed, "level": LEVEL, "per_k": per_k}


def _spread(values: list[float]) -> dict[str, float]:
    """Mean and central ``LEVEL`` interval (percentiles) of per-draw figures."""
    if not values:
        return {"mean": math.nan, "low": math.nan, "high": math.nan}
    tail = (1 - LEVEL) / 2 * 100
    return {"mean": float(np.mean(values)), "low": float(np.percentile(values, tail)),
            "high": float(np.percentile(values, 100 - tail))}


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan
