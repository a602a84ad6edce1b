"""Distributed contrastive training: Ray Train + DeepSpeed ZeRO + the exact gradient cache.

``run.py`` builds the ``TorchTrainer`` (driver side); ``loop.py`` is what each worker runs;
``grad_cache.py`` the step; ``gather.py`` the one gather of embeddings across workers (the losses are
``hlip_ray.model.contrastive``'s); ``engine.py`` DeepSpeed and its schedule; ``checkpoints.py`` writing and
restoring (the format: ``hlip_ray/run_checkpoint.py``);
``tracking.py`` where metrics go.
"""
