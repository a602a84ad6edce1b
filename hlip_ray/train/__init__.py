"""Distributed contrastive training: Ray Train + DeepSpeed ZeRO + the exact gradient cache.

``run.py`` builds the ``TorchTrainer`` (driver side); ``loop.py`` is what each worker runs;
``grad_cache.py`` the step; ``losses.py`` the global-batch losses; ``engine.py`` DeepSpeed;
``tracking.py`` where metrics go.
"""
