import os
import sys

# tests import the shared case table as a plain module
sys.path.insert(0, os.path.dirname(__file__))

import pytest


@pytest.fixture
def jax_x64():
    """jax with 64-bit floats on for one test (the optax oracles run in float64), restored after."""
    jax = pytest.importorskip("jax")
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", old)
