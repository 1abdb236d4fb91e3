"""Test set-up: 8 simulated CPU devices (set before jax is imported) and f32-exact matmuls."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))  # tests import oracle/reference as top-level modules

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
