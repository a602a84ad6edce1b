"""Evaluation of trained study-report models.

``zeroshot.py``: prompts, scores, AUC and ``evaluate_zeroshot``, the one evaluation path (the
trainer's validation calls it too); ``run.py``: a split of the data through it (``hlip-ray eval``);
``trained_model.py``: a model from a run checkpoint or an HLIP release. Importable without the
trainer or DeepSpeed.
"""
