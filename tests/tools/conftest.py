"""Fixtures for the tools tier."""

from tests.registry import registry, token_registry  # noqa: F401 - a real registry on 127.0.0.1, for any tools test
