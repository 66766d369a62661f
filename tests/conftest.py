"""Test setup: 8 simulated CPU devices, so sharded code runs as it would on a pod slice."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
