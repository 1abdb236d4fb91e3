"""`jaxmoe-train` / `python -m jaxmoe.train`: pick a run by name, override any field.

    jaxmoe-train --config tiny --steps 50 --workdir /tmp/run     # resumes if /tmp/run has one
    jaxmoe-train --config tiny --help                           # every flag with its default
    jaxmoe-train merge WORKDIR OUT_DIR                          # LoRA folded in -> Orbax

Exit codes: 0 done (or preempted and saved, or nothing to do), 2 bad configuration (reported
before compiling) or an unreadable --model.init_from checkpoint.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    from jaxmoe.train.config import TrainConfigError
    from jaxmoe.train.flags import parse_args

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:  # jaxmoe-train merge WORKDIR OUT_DIR (jaxmoe/train/merge.py)
        from jaxmoe.train.merge import main as merge_main

        return merge_main(argv[1:])
    try:
        cfg = parse_args(argv)
    except TrainConfigError as e:
        print(f"jaxmoe-train: error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from jaxmoe.config import ConfigError
    from jaxmoe.safetensors_io import CheckpointError
    from jaxmoe.train.trainer import run

    try:
        run(cfg)
    except (ConfigError, CheckpointError) as e:  # TrainConfigError, a bad --model.init_from file
        print(f"jaxmoe-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
