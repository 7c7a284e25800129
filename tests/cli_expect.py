"""Moved to tests/helpers.py (the one module of shared test helpers); kept only until
every test file imports it from there."""

from tests.helpers import assert_refused  # noqa: F401
