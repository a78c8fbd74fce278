"""Jitted calls on NNX modules that walk the module graph once, not on every call.

`nnx.jit` splits its module arguments into a graph definition and arrays, and writes the
results back into the modules, on every call. That Python work grows with the number of
Variables: with two backbones' hundreds of arrays it cost far more than the jitted work itself
and was most of a training step on cached features (measured, docs/scaling.md "Jitted calls
without nnx.jit"). Here a module is split once
(`nnx.split`), and every call hands plain pytrees of arrays to one module-level `jax.jit`
function, whose C++ dispatch flattens them in well under a millisecond. The graph definition
is a static argument: hashing it costs a few milliseconds per call, and equal graph
definitions share one compilation however often a module is bound.

`Bound` is for read-only functions (evaluation, feature extraction, the prompt table):
whatever `fn` changes in its module is dropped. The training step, which must keep its
updates, is `trainer.TrainStep`, built on the same pattern.

The split State holds the module's own Variable objects (flax >= 0.11), so a bound call
reads their values at call time: in-place updates (`nnx.update`, a checkpoint restore)
are seen; a changed module structure is not (bind again).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
from flax import nnx


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def _apply(fn: Callable, graphdef: Any, state: Any, args: tuple, static: tuple) -> Any:
  return fn(nnx.merge(graphdef, state), *args, **dict(static))


class Bound:
  """`jax.jit(fn)(module, *args, **static)` with `module` split once, at construction.

  `fn` must be a module-level function or a method of the module's class, e.g. `SSVP.features`
  (it is part of the compilation key); keyword
  arguments are static (hashable, one compilation per value). Variable values are read at
  each call; the module's structure is fixed at construction.
  """

  def __init__(self, fn: Callable, module: nnx.Module):
    self.fn = fn
    self.graphdef, self.state = nnx.split(module)

  def __call__(self, *args, **static):
    return _apply(self.fn, self.graphdef, self.state, args, tuple(sorted(static.items())))
