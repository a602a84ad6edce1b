"""The study data plane: manifests, storage, decoding, preprocessing, Ray Data pipeline, shards.

Imports neither the model nor the trainer.
"""
