"""Parallelism: logical-axis rules applied from pjit_configs presets, shard_map expert parallelism,
multi-host set-up. Model code only asks `context.current_ep()` whether its MoE runs expert-parallel."""
