"""Test-wide settings (CPU only, offline, small thread pools) and the fixtures several modules share.

Plain helpers (configs, random reference models) live in tests/helpers/ (see its docstring).
"""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# One persistent compilation cache for the whole run (both xdist workers and the CLI
# subprocesses inherit it): the same tiny models compile once, not once per test.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from helpers import tiny  # noqa: E402  (imports jax: after the settings above)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The tiny config's demo data, written once per module; runs copy nothing, they point their roots here."""
  return tiny.write_demo_data(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory) -> str:
  """A work directory trained with configs/tiny.py, with its demo target data written (once per run)."""
  return tiny.train_shared_workdir(tmp_path_factory)


@pytest.fixture(scope="session")
def engine(trained_workdir):
  """The inference engine of `trained_workdir`."""
  from ssvp_jax import inference
  return inference.load_engine(trained_workdir)
