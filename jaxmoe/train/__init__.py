"""Training: `jaxmoe-train` (cli), TrainConfig and named runs (config), data, optimizer,
the functional train step and losses (step), Orbax checkpoints, metrics, the loop (trainer)."""

from jaxmoe.train.config import TrainConfig, TrainConfigError
from jaxmoe.train.runs import RUNS, get_run
from jaxmoe.train.flags import parse_args

__all__ = ["RUNS", "TrainConfig", "TrainConfigError", "get_run", "parse_args", "run"]


def run(cfg: TrainConfig) -> dict:
    from jaxmoe.train.trainer import run as _run

    return _run(cfg)
