"""functional.Bound: same results as calling the module, one trace per shape, current variable values."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssvp_jax import functional

TRACES = []


def _affine(model: nnx.Linear, x, *, scale: float = 1.0):
  TRACES.append(x.shape)  # runs only while tracing
  return model(x) * scale


def test_bound_matches_the_module_and_traces_once_per_shape():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  x = np.arange(12, dtype=np.float32).reshape(4, 3)
  TRACES.clear()
  run = functional.Bound(_affine, model)
  np.testing.assert_allclose(run(x), model(jnp.asarray(x)), rtol=1e-6)
  np.testing.assert_allclose(run(x, scale=2.0), 2 * model(jnp.asarray(x)), rtol=1e-6)
  run(x + 1)                                    # same shape and static value: no new trace
  functional.Bound(_affine, model)(x)           # a second binding of an equal graph shares it
  assert TRACES == [(4, 3), (4, 3)]             # scale=1.0 and scale=2.0
  run(x[:2])
  assert TRACES[-1] == (2, 3)


def test_bound_reads_the_current_variable_values():
  """Evaluation binds a model that a checkpoint restore or `TrainStep.sync` updates in place."""
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  x = np.ones((1, 3), np.float32)
  run = functional.Bound(_affine, model)
  before = np.asarray(run(x))
  nnx.update(model, jax.tree.map(lambda v: v + 1.0, nnx.state(model, nnx.Param)))
  np.testing.assert_allclose(run(x), before + 4.0, rtol=1e-6)  # bias + 1, and 3 inputs of 1 times kernel + 1
