"""What users do with a trained study-report model. Importable without the trainer or DeepSpeed.

``held_out.py``: ``evaluate``, the one evaluation path (the trainer's validation calls it too):
held-out contrastive loss, study<->report retrieval R@k, and zero-shot AUC where there are labels;
``zeroshot.py``: prompts (templates), scores and AUC; ``metrics.py``: bootstrap intervals, thresholds,
linear probe; ``run.py`` and ``report.py``: a split through it all, as JSON, Markdown and ROC curves
(``hlip-ray eval``); ``embed.py``: a whole archive into Parquet on Ray Data actors (``hlip-ray embed``);
``predict.py``: one local study (``hlip-ray predict``); ``relevance.py``: where the model looks (relevance
maps); ``export.py``: HLIP/open_clip and safetensors files (``hlip-ray export``); ``trained_model.py``: a
model from a run checkpoint or an HLIP release; ``placement.py``: where the model runs (``eval.device``, and
the Ray resources of the actors that hold it).
"""
