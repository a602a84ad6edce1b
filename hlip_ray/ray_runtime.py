"""The Ray cluster a command runs on: connecting to it (the cluster in ``RAY_ADDRESS``, else one that
``ray start`` runs on this machine, else a local one started here), and what it is and can grow to.

Workers of a local cluster inherit this process's environment, AWS credentials included; on a
real cluster each node brings its own (instance profile, node environment). Credentials are
never passed in task arguments, runtime environments or configs.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


def connect(num_cpus: int | None = None, resources: dict[str, float] | None = None, *,
            log_to_driver: bool = True) -> bool:
    """``ray.init`` once, saying in one line (stderr) which cluster: ``RAY_ADDRESS`` if set; else the
    cluster that ``ray start`` runs on this machine (a cluster's head, where jobs and sweeps are driven
    from), if one runs; else a local cluster started here (``num_cpus``, ``resources``).
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
    running = None if address else running_cluster()
    if address or running:
        ray.init(address=address or running, log_to_driver=log_to_driver)
        nodes = sum(node["Alive"] for node in ray.nodes())
        how = "RAY_ADDRESS" if address else "started with `ray start` on this machine"
        _say(f"connected to the Ray cluster at {address or running} ({how}; {nodes} node(s) up)")
    else:
        # With the dashboard: Ray Train 2.60's placement-group cleaner asks the state API (which the
        # dashboard serves) whether the run's controller is alive, and without it warns every 2 s.
        ray.init(address="local", num_cpus=num_cpus, resources=resources, include_dashboard=True,
                 dashboard_host="127.0.0.1", log_to_driver=log_to_driver)
        _say(f"started a local Ray cluster ({int(ray.cluster_resources().get('CPU', 0))} logical CPUs); "
             "no cluster runs on this machine and RAY_ADDRESS is not set")
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (`ray job stop`, `kill`, a pod's termination) then ends the command as Ctrl-C does
        # (training names the checkpoint it resumes from). Set after ray.init, whose own handler
        # would otherwise end the process at once.
        signal.signal(signal.SIGTERM, _interrupt)
    return True


def _say(line: str) -> None:
    print(f"hlip-ray: {line}", file=sys.stderr, flush=True)


def running_cluster() -> str | None:
    """The address of the cluster that ``ray start`` runs on this machine: the one it last started (Ray's
    ``ray_current_cluster`` file, under ``RAY_TMPDIR`` where set), if its GCS still runs here; else None
    (no cluster, or a stale file left by one that was stopped)."""
    from ray._private.services import find_gcs_addresses
    from ray._private.utils import read_ray_address

    address = read_ray_address()
    if address and address in find_gcs_addresses():
        return address
    return None


def autoscaling_node_types() -> dict[str, dict] | None:
    """The cluster's node types as its autoscaler sees them, ``{name: {"resources": {...}, "most": n}}`` with
    ``most`` the nodes of the type the cluster can have (the head's type: 1), or None where the cluster does
    not autoscale (or its autoscaler is not in view). Ray must be initialised.

    Read from the autoscaling config of the autoscaler that runs on this node (``ray up``'s
    ``~/ray_bootstrap_config.yaml``, ``ray start --autoscaling-config=FILE``): drivers run on the head, where
    it runs. On KubeRay the autoscaler is a container of its own, out of view: set
    ``tune.max_concurrent_trials`` there.
    """
    import psutil
    import ray
    import yaml

    gcs = f"--gcs-address={ray.get_runtime_context().gcs_address}"
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if not any(part.endswith("monitor.py") for part in cmdline[:3]) or gcs not in cmdline:
            continue
        path = next((part.split("=", 1)[1] for part in cmdline if part.startswith("--autoscaling-config=")), None)
        if path is None:
            continue
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as handle:
                config = yaml.safe_load(handle) or {}
            head = config.get("head_node_type")
            return {name: {"resources": dict(spec.get("resources") or {}),
                           "most": 1 if name == head else int(spec.get("max_workers") or 0)}
                    for name, spec in (config.get("available_node_types") or {}).items()}
        except (OSError, ValueError, AttributeError, yaml.YAMLError):
            continue
    return None


def max_cluster_resources() -> tuple[dict[str, float], str]:
    """``(resources, source)``: what the cluster can hold at its largest, and where that was read: the
    cluster config in Ray's GCS where a cluster manager reported one (what Ray Train and Ray Data size
    themselves by), else the autoscaler's node types on this node (each type's resources × its
    ``max_workers``, the head's once), else the resources of the nodes up now (a cluster that does not
    autoscale). Ray must be initialised."""
    import ray
    from ray._private.state import state

    reported = state.get_max_resources_from_cluster_config()
    if reported:
        return {key: float(value) for key, value in reported.items()}, "the cluster config in Ray's GCS"
    types = autoscaling_node_types()
    if types:
        total: dict[str, float] = {}
        for spec in types.values():
            for key, value in spec["resources"].items():
                total[key] = total.get(key, 0) + value * spec["most"]
        return total, "the autoscaler's node types"
    return dict(ray.cluster_resources()), "the nodes up now"


def is_local_cluster() -> bool:
    """Whether Ray runs on this machine alone and cannot grow: one node, this one, no autoscaler that
    could start others, not in a Kubernetes pod (whose disk goes with it). Only there is a plain local
    path (a run's checkpoints, a sweep's state) where every process of the run, and the user after it,
    can read it. Ray must be initialised."""
    import ray
    from ray._private.state import state

    if os.environ.get("KUBERNETES_SERVICE_HOST") or autoscaling_node_types() or state.get_cluster_config():
        return False
    alive = [node for node in ray.nodes() if node["Alive"]]
    return len(alive) == 1 and alive[0]["NodeID"] == ray.get_runtime_context().get_node_id()


def check_shared_storage(path: str, key: str) -> None:
    """A plain local path (``key``'s value) is refused on any cluster but this machine's own local one
    (``is_local_cluster``), whatever its nodes at the start: workers on other nodes, or on nodes the
    autoscaler starts later, would write where nobody reads. s3:// and shared mounts given as file://
    are taken anywhere. Ray must be initialised."""
    from hlip_ray.config import ConfigError

    if "://" in path or is_local_cluster():
        return
    import ray

    nodes = sum(node["Alive"] for node in ray.nodes())
    grows = " and autoscales" if autoscaling_node_types() else ""
    raise ConfigError(f"{key} {path!r} is local to this node, but the cluster has {nodes} node(s) up{grows}: use "
                      "s3://bucket/prefix or a shared mount given as file:///mnt/shared/...")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def local_cpus(num_workers: int | list[int]) -> int:
    """Logical CPUs for a local cluster that trains: the cores, plus one for each trainer
    (``train.num_workers``, or its maximum when elastic).

    Each trainer holds a CPU slot for the whole run; without slots of their own beside them, Ray
    Data's decode tasks would get none and the training stream would wait forever.
    """
    return (os.cpu_count() or 1) + (max(num_workers) if isinstance(num_workers, list) else num_workers)
