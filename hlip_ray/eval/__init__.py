"""Evaluation: a trained model's figures on a labelled split, and where the model runs. Importable without
the trainer or DeepSpeed.

``held_out.py``: ``evaluate``, the one evaluation path (the trainer's validation calls it too):
held-out contrastive loss, study<->report retrieval R@k, and zero-shot AUC where there are labels;
``zeroshot.py``: prompts (templates), scores and AUC; ``metrics.py``: bootstrap intervals, thresholds,
linear and few-shot probes; ``evaluate.py`` and ``report.py``: a split through it all, as JSON, Markdown
and ROC curves (``hlip-ray eval``); ``relevance.py``: where the model looks (relevance maps);
``placement.py``: where the model runs (``eval.device``, and the Ray resources of the actors that hold it).
Using a trained model on studies without labels is ``hlip_ray.inference``'s.
"""
