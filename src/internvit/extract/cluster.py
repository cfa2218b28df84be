"""The Ray cluster an engine runs on: connect to one (or start one on loopback), size the actor pool from what it
reports, and shut down what was started. Used by the Ray extract engine (`extract/ray.py`) and `serve --ray`.

References:
    - Ray resources and actor scheduling: https://docs.ray.io/en/latest/ray-core/scheduling/resources.html;
    - Ray's loopback handling: `ray._private.services.resolve_ip_for_localhost` (see `LOOPBACK_ENV`).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

# Ray (2.40 to 2.60 at least) turns `_node_ip_address="127.0.0.1"` (and `ray start --node-ip-address 127.0.0.1`)
# into the machine's network address (`ray._private.services.resolve_ip_for_localhost`) and listens on every
# interface, unless this variable is "0"; with it, a local instance binds to loopback only. It is read when `ray`
# is imported, and by every process Ray starts.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
TASK_CPUS = 1.0  # what each prepare or write task reserves; the actor pool always leaves this much free


class RayRunError(RuntimeError):
    """The Ray run could not start as asked, or stopped making progress."""


def is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def connect(address: str | None) -> tuple[bool, float]:
    """Start a local instance on loopback (address None) or connect to `address`; (started by us, seconds)."""
    t = time.perf_counter()
    if address is None or is_loopback(address):
        os.environ.setdefault(LOOPBACK_ENV, "0")  # before `import ray`; inherited by the processes Ray starts
    try:
        import ray
    except ImportError:
        raise ImportError("the ray engine needs Ray Data: pip install 'internvit[ray]'") from None
    if ray.is_initialized():
        return False, 0.0
    if address is not None:
        ray.init(address=address)
        return True, time.perf_counter() - t
    from ray._private import ray_constants  # `ray` was imported before the variable was set: same effect

    cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = cluster_mode and os.environ.get(LOOPBACK_ENV) != "0"
    try:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False)  # never a `ray start` one
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
    where = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})
    if where != ["127.0.0.1"]:
        ray.shutdown()
        raise RayRunError(f"the local Ray instance came up on {', '.join(where)} instead of loopback; start one "
                          f"yourself ({LOOPBACK_ENV}=0 ray start --head --node-ip-address 127.0.0.1) and pass "
                          "address='127.0.0.1:6379'")
    return True, time.perf_counter() - t


@dataclass
class Pool:
    num_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int | None  # torch threads per actor (CPU actors); None leaves Ray's default (GPU actors)


def size_pool(num_actors: int | None, cpus_per_actor: float | None, gpus_per_actor: float,
               max_useful: int | None = None) -> Pool:
    """Size the actor pool from what Ray reports now, leaving CPUs to the prepare and write tasks.

    Actors that take every CPU starve the tasks that feed them and the pipeline waits forever; so the actors
    together reserve at most `total CPUs - TASK_CPUS` (fractional CPUs: each gets min(1, that share)). A pool
    that does not fit the cluster as it is now is refused rather than waited for (scale an autoscaling cluster
    up first, e.g. with `ray.autoscaler.sdk.request_resources`). No more actors than `max_useful` (the number of
    batches, when known) are started.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    seen = f"Ray reports {cpus:g} CPUs and {gpus:g} GPUs on {len(nodes)} node(s)"
    if gpus_per_actor < 0 or (num_actors is not None and num_actors < 1):
        raise ValueError(f"num_actors must be >= 1 and gpus_per_actor >= 0, got {num_actors} and {gpus_per_actor}")
    if gpus_per_actor > 0:
        fit = int(gpus // gpus_per_actor + 1e-9)
        if num_actors is None:
            num_actors = max(fit, 1)
        if num_actors > fit:
            raise ValueError(f"{seen}: {num_actors} actors with {gpus_per_actor:g} GPU(s) each do not fit; "
                             "lower --num-actors or --gpus-per-actor")
    elif num_actors is None:
        num_actors = max(1, len(nodes))  # CPU actors: one per node, each with that node's cores
    if max_useful is not None:
        num_actors = max(1, min(num_actors, max_useful))
    free = cpus - TASK_CPUS
    if cpus_per_actor is None:
        cpus_per_actor = min(1.0, int(100 * free / num_actors) / 100)
    if cpus_per_actor <= 0 or num_actors * cpus_per_actor > free + 1e-6:
        raise ValueError(f"{seen}: {num_actors} actor(s) cannot share {free:g} CPUs and leave {TASK_CPUS:g} to the "
                         "tasks that read and preprocess the inputs (they would wait for each other forever); "
                         "use fewer actors or a bigger cluster")
    threads = None
    if gpus_per_actor == 0:
        per_node = -(-num_actors // max(1, len(nodes)))
        threads = max(1, int(min(n["CPU"] for n in nodes) // per_node)) if nodes else 1
    return Pool(num_actors, cpus_per_actor, gpus_per_actor, threads)


def shutdown(threads: list[threading.Thread]) -> None:
    """Stop the Ray instance this call started, also after a stall with the consumer thread still waiting.

    That thread's next Ray call would otherwise start a new instance (Ray's auto-init), which aborts this process
    a minute later; with auto-init off until the thread has ended, it gets an error and ends.
    """
    import ray
    from ray._private import auto_init_hook

    auto_connect = auto_init_hook.enable_auto_connect
    auto_init_hook.enable_auto_connect = False
    try:
        ray.shutdown()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        auto_init_hook.enable_auto_connect = auto_connect
