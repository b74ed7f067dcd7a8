"""Test-wide settings: hypothesis profiles (`default` for `make test`, `thorough` for
`make test-thorough`, which runs every property with ten times the examples)."""

from hypothesis import settings

settings.register_profile("default", max_examples=150, deadline=None)
settings.register_profile("thorough", max_examples=1500, deadline=None)
settings.load_profile("default")
