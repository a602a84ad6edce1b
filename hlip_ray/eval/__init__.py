"""Evaluation of trained study-report models.

``held_out.py``: ``evaluate``, the one evaluation path (the trainer's validation calls it too):
held-out contrastive loss, study<->report retrieval R@k, and zero-shot AUC where there are labels;
``zeroshot.py``: prompts, scores and AUC; ``run.py``: a split of the data through it (``hlip-ray eval``);
``trained_model.py``: a model from a run checkpoint or an HLIP release. Importable without the
trainer or DeepSpeed.
"""
