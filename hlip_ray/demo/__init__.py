"""What ``hlip-ray demo`` and ``hlip-ray synth`` run: the demo job (``job.py``) and its config
(``demo.yaml``, shipped as package data), a deterministic synthetic corpus of real DICOM and NIfTI
files (``synth.py``) and a local S3 endpoint (``local_s3.py``, moto's server: the ``demo`` extra). The
tests and benchmarks use them too. Not part of the data plane: nothing in ``hlip_ray.data``, ``model``,
``train`` or ``eval`` imports it. ``python -m hlip_ray.demo`` runs the job.
"""
