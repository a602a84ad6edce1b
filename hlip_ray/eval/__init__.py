"""Evaluation of trained study-report models: zero-shot classification and its metrics.

Importable without Ray or DeepSpeed; the trainer reuses it for validation.
"""
