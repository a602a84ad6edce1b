"""Connecting to Ray: the cluster in ``RAY_ADDRESS``, or a local one started here.

Workers of a local cluster inherit this process's environment, AWS credentials included; on a
real cluster each node brings its own (instance profile, node environment). Credentials are
never passed in task arguments, runtime environments or configs.
"""

from __future__ import annotations

import os
import signal
import threading


def connect(num_cpus: int | None = None, resources: dict[str, float] | None = None, *,
            log_to_driver: bool = True) -> bool:
    """``ray.init`` once: ``RAY_ADDRESS`` if set, else a local cluster (``num_cpus``, ``resources``).
    ``log_to_driver=False`` keeps workers' output in Ray's session logs, off this console.

    Returns whether this call connected (False when Ray was already initialised by the caller).
    """
    import ray

    if ray.is_initialized():
        return False
    # Ray Data logs its progress (with a line per operator) every 10 s where the console is not a
    # terminal (a log file, CI, `ray job logs`): every 30 s is enough to see where it is.
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "30")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        # With the dashboard: Ray Train 2.60's placement-group cleaner asks the state API (which the
        # dashboard serves) whether the run's controller is alive, and without it warns every 2 s.
        ray.init(address="local", num_cpus=num_cpus, resources=resources, include_dashboard=True,
                 dashboard_host="127.0.0.1", log_to_driver=log_to_driver)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (`ray job stop`, `kill`, a pod's termination) then ends the command as Ctrl-C does
        # (training names the checkpoint it resumes from). Set after ray.init, whose own handler
        # would otherwise end the process at once.
        signal.signal(signal.SIGTERM, _interrupt)
    return True


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def local_cpus(num_workers: int | list[int]) -> int:
    """Logical CPUs for a local cluster that trains: the cores, plus one for each trainer
    (``train.num_workers``, or its maximum when elastic).

    Each trainer holds a CPU slot for the whole run; without slots of their own beside them, Ray
    Data's decode tasks would get none and the training stream would wait forever.
    """
    return (os.cpu_count() or 1) + (max(num_workers) if isinstance(num_workers, list) else num_workers)
