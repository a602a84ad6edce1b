"""The embedded demo and the tools it shares with the tests and benchmarks: a deterministic
synthetic corpus of real DICOM and NIfTI files (``synth.py``) and a local S3 endpoint
(``local_s3.py``, moto's server). Not part of the data plane: nothing in ``hlip_ray.data``,
``model``, ``train`` or ``eval`` imports it. ``python -m hlip_ray.demo`` runs the job (``job.py``).
"""
