"""Runs a model exported by `python -m ssvp_jax.export` with nothing but jax and numpy (PIL to read files).

This file stands alone with `runner_io.py`: copy both next to the artifact and run

    python jaxexport_runner.py model.jaxexport photo.jpg more/*.png        # CSV on stdout

or use it from Python:

    from jaxexport_runner import ExportedModel, read_image
    model = ExportedModel("model.jaxexport")
    out = model(np.stack([read_image(p, model.input_size) for p in paths]))  # {"map", "score", ...}

Inputs are RGB images `[b, S, S, 3]` (S = `model.input_size`): float in [0, 1], or uint8 / uint16
(divided by 255 / 65535). Any batch size works (the batch dimension was exported symbolically); each
new one compiles once. Decisions need the image threshold stored at export time from calibration.json.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

import jax
import numpy as np
from jax import export as jax_export

try:  # standalone: runner_io.py copied next to this file
  from runner_io import Artifact, as_float_batch, cli_parser, read_image, score_to_csv
except ImportError:
  from ssvp_jax.runner_io import Artifact, as_float_batch, cli_parser, read_image, score_to_csv

__all__ = ["ExportedModel", "read_image", "main"]

FORMAT = "ssvp_jax.jaxexport/1"


class ExportedModel(Artifact):
  """An exported SSVP model: call it on a batch of images; `meta` holds sizes, category and thresholds."""

  def __init__(self, path: str):
    try:
      archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f"{path}: not a .jaxexport artifact ({type(e).__name__}: {e})") from None
    with archive:
      if "meta" not in archive or "function" not in archive:
        raise ValueError(f"{path}: not a .jaxexport artifact (no 'meta' / 'function' entry)")
      self.meta = json.loads(archive["meta"].tobytes().decode())
      if self.meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {self.meta.get('format')!r}, this runner reads {FORMAT!r}")
      self.exported = jax_export.deserialize(bytearray(archive["function"].tobytes()))
      weights = []
      for i, dtype in enumerate(self.meta["weight_dtypes"]):
        w = archive[f"w{i:04d}"]
        weights.append(w if w.dtype.name == dtype else w.view(jax.numpy.dtype(dtype)))  # bfloat16 as raw bits
    backend = jax.default_backend()  # "gpu" covers jax.export's "cuda" and "rocm"
    if not set({"gpu": ("cuda", "rocm")}.get(backend, (backend,))) & set(self.exported.platforms):
      raise ValueError(f"{path} was exported for {', '.join(self.exported.platforms)}; this machine runs {backend}")
    self.weights = jax.device_put(weights)  # once, not at every call
    self._call = jax.jit(self.exported.call)

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """images [b, S, S, 3] (or one [S, S, 3]) -> {"map": [b, M, M], "score", "s_global", "s_local": [b]}."""
    x = as_float_batch(images, self.input_size)
    return {k: np.asarray(v) for k, v in self._call(self.weights, x).items()}


def main(argv: Sequence[str] | None = None) -> int:
  p = cli_parser("Scores image files with an exported SSVP model (CSV on stdout).", "the .jaxexport file")
  args = p.parse_args(argv)
  model = ExportedModel(args.model)
  return score_to_csv(model, args.images, args.batch_size)


if __name__ == "__main__":
  sys.exit(main())
