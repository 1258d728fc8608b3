import jax
import pytest


def pytest_collection_modifyitems(config, items):
    if jax.device_count() < 8:
        skip = pytest.mark.skip(reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
        for item in items:
            item.add_marker(skip)
