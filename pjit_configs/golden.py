"""Golden PartitionSpec dumps: per preset, the spec of every parameter of the tiny model and of
DeepSeek-V3 671B (abstract shapes; no devices needed), so a sharding change is a visible diff
in tests/golden/partition_specs/. AdamW's moments follow their parameters (same logical axes).

    python -m pjit_configs.golden            # rewrite the dumps after an intended change
    python -m pjit_configs.golden --check    # what tests/test_pjit_configs.py checks
"""

from __future__ import annotations

import argparse
import difflib
import functools
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DIR = os.path.join(REPO, "tests", "golden", "partition_specs")
MODELS = ("tiny", "deepseek_v3_671b")
# the registered presets plus the GPU-cluster size BENCHMARKS.md plans for
EXTRA = ("h100-32x8", "h200-32x8")


def preset_names() -> list[str]:
    from pjit_configs.presets import PRESETS

    return sorted(PRESETS) + list(EXTRA)


@functools.lru_cache(maxsize=None)
def abstract_params(model: str):
    from flax import nnx

    import jaxmoe

    cfg = jaxmoe.get_preset(model)
    return nnx.state(nnx.eval_shape(lambda: jaxmoe.DeepseekV3(cfg, rngs=nnx.Rngs(0))))


def dump(name: str) -> str:
    """The text dump of one preset."""
    from flax import nnx

    from jaxmoe import axes
    from jaxmoe.parallel.sharding import logical_axes_of, spec_for
    from pjit_configs import get

    p = get(name)
    table = {r[0]: r for r in p.rules}
    lines = [f"# mesh preset {p.name}: {p.describe()} ({p.size} devices; {p.device}"
             f"{f', {p.hbm_gib:g} GiB' if p.hbm_gib else ''}); ep {p.ep}"
             f"{f' (capacity factor {p.capacity_factor:g})' if p.capacity_factor else ''}",
             "# regenerate: python -m pjit_configs.golden", "", "## rules"]
    lines += [f"{logical:12s} -> {mesh}" for logical, mesh in p.rules]
    batch = spec_for((axes.ACT_BATCH, axes.ACT_SEQ), (1 << 30, 1), table, p.axis_sizes)
    lines += ["", f"## batch [B, T] -> {batch}"]
    for model in MODELS:
        lines += ["", f"## params of {model}: path shape logical -> spec"]
        for path, var in nnx.to_flat_state(abstract_params(model)):
            logical = logical_axes_of(var)
            shape = tuple(var.get_value().shape)
            key = ".".join(str(k) for k in path)
            spec = spec_for(logical, shape, table, p.axis_sizes, where=key) if logical else "P()"
            lines.append(f"{key} {list(shape)} {logical} -> {spec}")
    return "\n".join(lines) + "\n"


def path_of(name: str) -> str:
    return os.path.join(GOLDEN_DIR, f"{name}.txt")


def diff(name: str) -> str:
    """'' when the checked-in dump matches; else a unified diff (checked-in -> now)."""
    now = dump(name)
    try:
        with open(path_of(name)) as f:
            old = f.read()
    except FileNotFoundError:
        old = ""
    if old == now:
        return ""
    return "".join(difflib.unified_diff(old.splitlines(True), now.splitlines(True),
                                        f"golden/{name}.txt", f"now/{name}.txt"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare, write nothing")
    ap.add_argument("names", nargs="*", help="presets (default: all)")
    a = ap.parse_args(argv)
    names = a.names or preset_names()
    bad = 0
    for n in names:
        if a.check:
            d = diff(n)
            if d:
                bad += 1
                sys.stdout.write(d)
        else:
            os.makedirs(GOLDEN_DIR, exist_ok=True)
            with open(path_of(n), "w") as f:
                f.write(dump(n))
            print(f"wrote {os.path.relpath(path_of(n), REPO)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
