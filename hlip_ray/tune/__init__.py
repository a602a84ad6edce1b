"""Sweeps with Ray Tune: spaces over the config tree (``space.py``), trials that are whole training runs
(``sweep.py``), one console line per trial event (``events.py``), results chosen on accuracy per compute
(``results.py``)."""
