"""Multi-host set-up: `jax.distributed.initialize` from flags, environment or auto-detection.

Where the coordinator comes from, first match wins:
1. explicit arguments (the trainer's `--dist.coordinator host:port --dist.num_processes N
   --dist.process_id i`), `coordinator="auto"` asks JAX to detect the cluster;
2. JAXMOE_COORDINATOR / JAXMOE_NUM_PROCESSES / JAXMOE_PROCESS_ID (what a launcher exports);
3. auto-detection: a multi-host TPU slice or multi-slice job (TPU_WORKER_HOSTNAMES with more
   than one host, MEGASCALE_COORDINATOR_ADDRESS), SLURM with more than one task, or Open MPI
   (OMPI_COMM_WORLD_SIZE > 1): JAX's own cluster detection then fills in every value.
Nothing found: a single process, no initialisation. Must run before any other JAX call that
touches devices.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping


ENV_COORDINATOR = "JAXMOE_COORDINATOR"
ENV_NUM_PROCESSES = "JAXMOE_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXMOE_PROCESS_ID"
CPU_COLLECTIVES = ("gloo", "mpi", "megascale")  # jax_cpu_collectives_implementation's values


class DistributedError(ValueError):
    """Inconsistent multi-host settings; the message names the flag or variable."""


@dataclasses.dataclass(frozen=True)
class DistPlan:
    """What `initialize` will do: `mode` is 'single', 'explicit' or 'auto' (JAX detects)."""

    mode: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    source: str = ""

    def describe(self) -> str:
        if self.mode == "single":
            return "single process"
        if self.mode == "auto":
            return f"cluster auto-detected by JAX ({self.source})"
        return (f"process {self.process_id} of {self.num_processes}, coordinator "
                f"{self.coordinator} ({self.source})")


def detect_cluster(env: Mapping[str, str]) -> str | None:
    """The name of a multi-process launcher JAX can auto-configure, from the environment."""
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return f"TPU pod slice, {len(hosts)} hosts"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "TPU multi-slice (megascale)"
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return f"SLURM, {env['SLURM_NTASKS']} tasks"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return f"Open MPI, {env['OMPI_COMM_WORLD_SIZE']} ranks"
    return None


def resolve(coordinator: str = "", num_processes: int | None = None,
            process_id: int | None = None, env: Mapping[str, str] | None = None) -> DistPlan:
    """Decide how to initialise (no side effects; see the module docstring for the order)."""
    env = os.environ if env is None else env
    if coordinator == "auto":
        return DistPlan("auto", source="--dist.coordinator auto")
    source = "flags"
    if not coordinator:
        _check_no_orphan_flags(num_processes, process_id, env)
    if not coordinator and env.get(ENV_COORDINATOR):
        coordinator, source = env[ENV_COORDINATOR], f"${ENV_COORDINATOR}"
        try:
            num_processes = int(env.get(ENV_NUM_PROCESSES, ""))
            process_id = int(env.get(ENV_PROCESS_ID, ""))
        except ValueError:
            raise DistributedError(
                f"${ENV_COORDINATOR}={coordinator!r} needs integer ${ENV_NUM_PROCESSES} and "
                f"${ENV_PROCESS_ID} (found {env.get(ENV_NUM_PROCESSES)!r}, "
                f"{env.get(ENV_PROCESS_ID)!r})") from None
    if coordinator:
        if ":" not in coordinator:
            raise DistributedError(f"coordinator {coordinator!r} ({source}): expected host:port "
                                   "or 'auto'")
        if num_processes is None or process_id is None or not 0 <= process_id < num_processes:
            raise DistributedError(f"coordinator {coordinator!r} ({source}): process id "
                                   f"{process_id} must be in [0, num_processes={num_processes})")
        return DistPlan("explicit", coordinator, num_processes, process_id, source)
    found = detect_cluster(env)
    return DistPlan("auto", source=found) if found else DistPlan("single")


def _check_no_orphan_flags(num_processes: int | None, process_id: int | None,
                           env: Mapping[str, str]) -> None:
    """--dist.num_processes / --dist.process_id without --dist.coordinator would silently
    train one process (or be overridden by the environment): refuse unless the environment's
    values are the same."""
    given = {"--dist.num_processes": (num_processes, 1, ENV_NUM_PROCESSES),
             "--dist.process_id": (process_id, 0, ENV_PROCESS_ID)}
    for flag, (value, single, var) in given.items():
        if value is None or value == single:
            continue
        if not env.get(ENV_COORDINATOR):
            raise DistributedError(
                f"{flag}={value} needs a coordinator: pass --dist.coordinator host:port (or "
                f"'auto' on a cluster JAX detects) or set ${ENV_COORDINATOR}; without one the "
                "run would train a single process")
        if env.get(var, "").strip() != str(value):
            raise DistributedError(
                f"{flag}={value} disagrees with ${var}={env.get(var)!r} (the coordinator comes "
                f"from ${ENV_COORDINATOR}); pass --dist.coordinator to use the flags")


def init_distributed(coordinator: str = "", num_processes: int | None = None,
                     process_id: int | None = None, cpu_collectives: str = "gloo",
                     env: Mapping[str, str] | None = None) -> DistPlan:
    """Resolve and call `jax.distributed.initialize` (once; a no-op for a single process).
    `cpu_collectives` picks the cross-process collectives of the CPU backend (gloo or mpi)."""
    import jax

    if cpu_collectives not in CPU_COLLECTIVES:
        raise DistributedError(f"--dist.cpu_collectives={cpu_collectives!r}: must be one of "
                               f"{CPU_COLLECTIVES}")
    plan = resolve(coordinator, num_processes, process_id, env)
    if plan.mode == "single":
        return plan
    try:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        cpu_ok = True
    except AttributeError:  # a JAX without the option: only accelerator backends can run
        cpu_ok = False
    if plan.mode == "auto":
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=plan.coordinator,
                                   num_processes=plan.num_processes, process_id=plan.process_id)
    if not cpu_ok and jax.default_backend() == "cpu" and jax.process_count() > 1:
        raise DistributedError(f"jax {jax.__version__} has no jax_cpu_collectives_implementation "
                               "option: its CPU backend cannot run collectives across processes")
    return plan
