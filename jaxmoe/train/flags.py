"""The `jaxmoe-train` command line: every `TrainConfig` field as a typed `--section.field` flag,
`--model.overrides` for the architecture, `--help` generated from the field comments.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from typing import Any

from jaxmoe.train.config import TrainConfig, TrainConfigError, _fields, _parse_value
from jaxmoe.train.runs import RUNS, get_run


# ------------------------------------------------------------------------ typed overrides
def flag_table(cfg: TrainConfig) -> dict[str, tuple[str | None, str, Any]]:
    """flag -> (section or None, field, type) for every leaf field."""
    out = {}
    for name, typ in _fields(TrainConfig).items():
        if dataclasses.is_dataclass(typ):
            for sub, styp in _fields(typ).items():
                out[f"{name}.{sub}"] = (name, sub, styp)
        else:
            out[name] = (None, name, typ)
    return out


def apply_overrides(cfg: TrainConfig, pairs: list[tuple[str, str]]) -> TrainConfig:
    table = flag_table(cfg)
    for flag, text in pairs:
        key = flag.replace("-", "_")
        if key not in table:
            close = [f for f in table if f.split(".")[-1] == key.split(".")[-1]]
            hint = f"; did you mean --{close[0]}?" if close else ""
            raise TrainConfigError(f"unknown flag --{flag}{hint} (see --help)")
        section, field, typ = table[key]
        value = _parse_value(text, typ, key)
        if section is None:
            cfg = dataclasses.replace(cfg, **{field: value})
        else:
            sec = dataclasses.replace(getattr(cfg, section), **{field: value})
            cfg = dataclasses.replace(cfg, **{section: sec})
    return cfg


@functools.lru_cache(maxsize=None)
def _describe(section: str | None) -> dict[str, str]:
    """Field comments from the source (shown in --help)."""
    import inspect
    cls = TrainConfig if section is None else _fields(TrainConfig)[section]
    out, last = {}, None
    try:
        for line in inspect.getsource(cls).splitlines():
            line = line.strip()
            if ":" in line and "#" in line and not line.startswith("#"):
                last = line.split(":", 1)[0].strip()
                out[last] = line.split("#", 1)[1].strip()
            elif line.startswith("#") and last is not None:  # the comment goes on below
                out[last] += " " + line.lstrip("#").strip()
            else:
                last = None
    except (OSError, TypeError):
        pass
    return out


def build_parser(cfg: TrainConfig) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="jaxmoe-train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=("Train a jaxmoe DeepseekV3. Pick a run with --config, override any field.\n"
                     f"runs: {', '.join(sorted(RUNS))}; defaults below are run "
                     f"{cfg.name!r}."),
        epilog="example: jaxmoe-train --config tiny --steps 50 --workdir /tmp/run")
    ap.add_argument("--config", default=cfg.name, help="named run (default %(default)s)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    groups: dict[str | None, Any] = {}
    for flag, (section, field, typ) in flag_table(cfg).items():
        if section not in groups:
            groups[section] = ap.add_argument_group(section or "run")
        desc = _describe(section).get(field, "")
        default = getattr(cfg if section is None else getattr(cfg, section), field)
        tname = getattr(typ, "__name__", str(typ))
        names = [f"--{flag}"] + ([f"--{flag.replace('_', '-')}"] if "_" in flag else [])
        groups[section].add_argument(*names, dest=flag, metavar=tname.upper(), default=None,
                                     help=f"{desc} (default: {default!r})".strip())
    return ap


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """argv -> a validated TrainConfig (raises TrainConfigError; exits for --help)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="tiny")
    known, _ = pre.parse_known_args(argv)
    cfg = get_run(known.config)
    args, unknown = build_parser(cfg).parse_known_args(argv)
    if unknown:
        flag = unknown[0].split("=", 1)[0]
        if not flag.startswith("--"):
            raise TrainConfigError(f"unexpected argument {flag!r} (flags are --section.field VALUE)")
        apply_overrides(cfg, [(flag[2:], "")])  # raises, naming the closest flag
        raise TrainConfigError(f"unknown flag {flag} (see --help)")
    pairs = [(flag, v) for flag, v in vars(args).items()
             if v is not None and flag not in ("config", "print_config")]
    cfg = apply_overrides(cfg, pairs).validate()
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        raise SystemExit(0)
    return cfg
