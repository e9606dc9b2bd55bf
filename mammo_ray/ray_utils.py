"""Connect to Ray: an existing cluster when ``RAY_ADDRESS`` (or ``address``) is given,
otherwise a local Ray bound to 127.0.0.1 only."""
from __future__ import annotations

import logging
import os

from mammo_ray.console import filter_worker_lines, quiet_ray

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


# the stores' timeouts and the GCS emulator travel with the credentials: a worker builds its
# own filesystem (mammo_ray.stores) and must build it as the driver did
CREDENTIAL_PREFIXES = ("AWS_", "GOOGLE_APPLICATION_CREDENTIALS", "GCS_", "MAMMO_RAY_REMOTE_", "STORAGE_EMULATOR_HOST",
                       "CLOUD_STORAGE_EMULATOR_ENDPOINT")


def node_id() -> str:
    """The Ray node this code runs on ("local" outside Ray, e.g. a single-process baseline)."""
    try:
        import ray  # deferred: this module must import without Ray for the CLI's --help

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return "local"


def credential_env() -> dict[str, str]:
    """The usual object-store variables (``AWS_*``, GCS) of this process, to forward to workers.

    Inside a submitted job (``ray job submit``), variables the job's own ``runtime_env``
    already sets are left out: its workers have them, and Ray refuses a ``ray.init``
    runtime_env that repeats a key of the job's.
    """
    import json

    job_env: dict = {}
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw:
        try:
            job_env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
        except (ValueError, AttributeError):
            job_env = {}
    return {k: v for k, v in os.environ.items() if k.startswith(CREDENTIAL_PREFIXES) and k not in job_env}


def remote_args(paths: list[str]) -> dict:
    """``runtime_env`` for Ray Data operators that touch ``paths``: the driver's object-store
    credentials and endpoint when any path is a URI, nothing for local paths.

    Workers of a running Ray do not see variables set in the driver after they started;
    forwarding the usual ``AWS_*`` / GCS variables makes ``s3://`` work the same from a
    laptop and from a submitted job.
    """
    from mammo_ray import io as mio

    if not any(mio.is_uri(p) for p in paths):
        return {}
    env = credential_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
             quiet: bool = True, dashboard: bool = True) -> None:
    """Initialise Ray once per process (no-op when already connected).

    Args:
        address: a cluster address (``auto``, ``ray://...``, ``host:port``); defaults to
            ``$RAY_ADDRESS``; without either a local Ray starts on loopback.
        num_cpus, num_gpus: resources of a local Ray (ignored when connecting).
        dashboard: start a local Ray's dashboard (on 127.0.0.1; 0.7 s more at start): Ray
            Train's placement-group cleaner asks the State API, which the dashboard serves,
            whether its controller lives, and warns every few seconds when it cannot.
    """
    import ray

    if ray.is_initialized():
        return
    import ray.data

    quiet_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = dict(include_dashboard=False, log_to_driver=True)
    if dashboard and not address:
        kwargs.update(include_dashboard=True, dashboard_host=LOOPBACK)
    creds = credential_env()
    if creds:
        # object-store credentials/endpoint of the driver reach every worker of this job
        kwargs["runtime_env"] = {"env_vars": creds}
    if quiet:
        kwargs["logging_level"] = logging.WARNING
    if address:
        logger.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
        filter_worker_lines()
        return
    # Local Ray: every component on loopback, nothing listening on the machine's address.
    # (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set by mammo_ray/__init__ before ray is imported.)
    # Token auth guards a cluster reachable by others; a loopback-only Ray has no such peer.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # One machine is never preempted, and its Ray exports no metrics anyone scrapes: Ray Train's
    # preemption watcher and metrics actors would be two more processes started per training
    # run (each trial of a sweep). Set before the local Ray starts, so its workers inherit them.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    from mammo_ray.resources import TASK_RETRIES

    # Ray retries a task its memory monitor killed forever by default (task_oom_retries=-1):
    # bounded here, so a task that cannot fit ends as errors.csv lines instead of a loop.
    # (On a cluster: `ray start` with RAY_task_oom_retries=3, see cluster/.)
    # address="local": a new Ray of our own, never a `ray start` cluster Ray would otherwise
    # pick up from /tmp/ray (which would also refuse _system_config)
    ray.init(address="local", _node_ip_address=LOOPBACK, num_cpus=num_cpus, num_gpus=num_gpus,
             _system_config={"task_oom_retries": TASK_RETRIES}, **kwargs)
    filter_worker_lines()
