"""cli.setup: the CLIs keep XLA compilations on disk unless JAX's own settings say otherwise."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNIPPET = ("from ssvp_jax import cli; cli.setup(); import jax, jax.numpy as jnp; "
           "jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready()")


def _run(env_updates: dict, tmp_path) -> None:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PLATFORMS="cpu", **env_updates)
  subprocess.run([sys.executable, "-c", SNIPPET], env=env, cwd=ROOT, check=True, capture_output=True)


def test_default_cache_under_xdg_cache_home(tmp_path):
  _run({}, tmp_path)
  assert os.listdir(tmp_path / "xdg" / "ssvp_jax" / "xla")


def test_jax_settings_win(tmp_path):
  _run({"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "mine"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}, tmp_path)
  assert os.listdir(tmp_path / "mine") and not (tmp_path / "xdg").exists()
  _run({"JAX_ENABLE_COMPILATION_CACHE": "false"}, tmp_path)
  assert not (tmp_path / "xdg" / "ssvp_jax" / "xla").exists() or not os.listdir(tmp_path / "xdg" / "ssvp_jax" / "xla")
