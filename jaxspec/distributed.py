"""Multi-host start-up from the environment: one process per host, every host running the same script.

Call ``initialize()`` first thing, before any JAX computation. It calls ``jax.distributed.initialize`` when

* ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` are set
  (any launcher: ssh, a multi-GPU node with one process per GPU, Kubernetes, ...; ``JAX_LOCAL_DEVICE_IDS``
  optionally restricts a process to some local devices), or
* a cluster JAX detects by itself spans more than one process: a Cloud TPU pod slice (``TPU_WORKER_HOSTNAMES``
  lists several workers), Slurm (``SLURM_NTASKS`` > 1) or Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1).

Otherwise it does nothing (one process). ``JAXSPEC_DISTRIBUTED=0`` turns it off, ``=1`` forces JAX's own
detection. Afterwards ``jax.devices()`` lists every host's devices, so ``sharding.make_mesh`` spans them all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax


def _int(env: Mapping[str, str], key: str) -> int | None:
    v = env.get(key, "").strip()
    return int(v) if v else None


def _managed_cluster(env: Mapping[str, str]) -> bool:
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", env.get("TPU_PROCESS_ADDRESSES", "")).split(",") if h]
    return len(hosts) > 1 or (_int(env, "SLURM_NTASKS") or 1) > 1 or (_int(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1


def settings(env: Mapping[str, str] | None = None) -> dict[str, object] | None:
    """The keyword arguments ``initialize`` would pass to ``jax.distributed.initialize``; None: single process."""
    env = os.environ if env is None else env
    flag = env.get("JAXSPEC_DISTRIBUTED", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return None
    addr = env.get("JAX_COORDINATOR_ADDRESS", "").strip()
    if addr:
        n, pid = _int(env, "JAX_NUM_PROCESSES"), _int(env, "JAX_PROCESS_ID")
        if n is None or pid is None:
            raise ValueError("JAX_COORDINATOR_ADDRESS is set: set JAX_NUM_PROCESSES and JAX_PROCESS_ID too")
        if not 0 <= pid < n:
            raise ValueError(f"JAX_PROCESS_ID {pid} is not in 0..{n - 1}")
        kw: dict[str, object] = {"coordinator_address": addr, "num_processes": n, "process_id": pid}
        if env.get("JAX_LOCAL_DEVICE_IDS", "").strip():
            kw["local_device_ids"] = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
        return kw
    if flag in ("1", "true", "yes", "on") or _managed_cluster(env):
        return {}
    return None


def initialize(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """Join the job described by the environment (see the module docstring); returns ``(process_index,
    process_count)``. Safe to call twice and on a single host."""
    kw = settings(env)
    if kw is not None and not jax.distributed.is_initialized():
        jax.distributed.initialize(**kw)
    return jax.process_index(), jax.process_count()
