import os

# Sharding tests need 8 devices; the flag must be set before JAX creates its CPU
# backend, so it is set here, before anything imports jax. Other tests run on
# device 0 as usual.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

from hypothesis import settings  # noqa: E402

# Derandomized in CI so a failure reproduces; jit compiles exceed the default deadline.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=12, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
