import os

from hypothesis import settings

# Derandomized in CI so a failure reproduces; jit compiles exceed the default deadline.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=12, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
