"""The whole inference function as an ONNX model, for onnxruntime and OpenVINO (issue 14).

    python -m ssvp_jax.export --workdir=runs/demo --out=runs/demo/model.onnx --format=onnx
    python -m ssvp_jax.onnx_runner runs/demo/model.onnx photo.jpg [--engine openvino]

What is converted is exactly `export.inference_function` (the function the .jaxexport artifact
serialises: PIL-exact resizing to each backbone, normalisation, CLIP and DINOv3, the heads with the
category's T_init baked in, and whatever else that function closes over), by jax2onnx, with its
weights as initializers. The graph has one input and four named outputs:

  images    float32 [B, S, S, 3] RGB in [0, 1]; B is a dynamic axis
  map       float32 [B, M, M]   (M = config.backbones.semantic.image_size)
  score     float32 [B]         S_final (Eq. 19)
  s_global  float32 [B]
  s_local   float32 [B]

The map upsampling is written as two matrices (`maps.bilinear_matrix`), like the smoothing, so no
resize primitive remains (jax2onnx cannot lower a resize with a symbolic batch). The artifact's
meta (the .jaxexport meta: sizes, category, thresholds, views, ...) travels in the ONNX metadata
properties: "ssvp_jax" holds it as JSON, and the keys a user looks for first are also there as plain
strings (input_size, map_size, category, image_threshold, pixel_threshold, checkpoint_fingerprint,
outputs). Weights go to external data (`<out>.data` next to the model) when they exceed 2 GB, the
protobuf limit of a single file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import jax
import numpy as np

from ssvp_jax import export, fileio, inference

log = logging.getLogger("ssvp_jax")

FORMAT = "ssvp_jax.onnx/1"
OUTPUTS = ("map", "score", "s_global", "s_local")
INPUT = "images"
EXTERNAL_DATA_BYTES = 2_000_000_000  # protobuf refuses a message of 2 GiB; stay clear of it
OPSET = 21


def fingerprint(weights: list[jax.Array]) -> str:
  """sha256 (first 16 hex digits) over the exported weights' dtypes, shapes and bytes: two artifacts
  with the same fingerprint compute with the same checkpoint."""
  h = hashlib.sha256()
  for w in weights:
    a = np.asarray(w)
    h.update(f"{a.dtype.name}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def export_onnx(engine: inference.Engine, out_path: str, input_size: int | None = None,
                calibration: dict[str, Any] | None = None) -> dict[str, Any]:
  """Converts `export.inference_function` for the engine's category to ONNX at `out_path`; returns the meta."""
  import jax2onnx
  import onnx_ir as ir

  size = int(input_size or engine.map_size)
  fn, weights = export.inference_function(engine, size)
  meta = export.artifact_meta(engine, size, calibration)
  outputs = tuple(meta["outputs"])  # OUTPUTS, + "bank_score" with a reference bank

  def images_only(images: jax.Array):
    out = fn(weights, images)  # the weights become initializers
    return tuple(out[k] for k in outputs)

  model = jax2onnx.to_onnx(images_only, [("B", size, size, 3)], model_name="ssvp_jax", opset=OPSET,
                           input_names=[INPUT], output_names=list(outputs), return_mode="ir")
  nbytes = sum(int(np.asarray(w).nbytes) for w in weights)
  meta.update(format=FORMAT, input=f"{INPUT}: float32 [B, S, S, 3] RGB in [0, 1]", outputs=list(outputs),
              checkpoint_fingerprint=fingerprint(weights), opset=OPSET,
              weight_bytes=nbytes, external_data=os.path.basename(out_path) + ".data" if nbytes > EXTERNAL_DATA_BYTES
              else None)
  props = {"ssvp_jax": json.dumps(meta)}
  for k in ("format", "input_size", "map_size", "category", "image_threshold", "pixel_threshold",
            "checkpoint_fingerprint"):
    props[k] = "" if meta[k] is None else str(meta[k])
  props["outputs"] = ",".join(outputs)
  model.metadata_props.update(props)

  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # "value type ... not known" for each shape constant
  with fileio.atomic_path(out_path) as tmp:  # a full disk or an interrupt leaves no half-written model
    if nbytes > EXTERNAL_DATA_BYTES:  # the weights go to <out>.data; the model (written last) names that file
      ir.save(model, tmp, external_data=meta["external_data"])
    else:
      ir.save(model, tmp)
  log.info("exported %s (ONNX opset %d, %.1f MB of weights%s)", out_path, OPSET, nbytes / 1e6,
           f", external data {meta['external_data']}" if meta["external_data"] else "")
  return meta


def is_onnx_model(path: str) -> bool:
  """Whether `path` is an ONNX model file (what export --format=onnx --overwrite may replace)."""
  try:
    import onnx
    onnx.load(path, load_external_data=False)
    return True
  except Exception:  # noqa: BLE001  (not a protobuf, not readable: not ours to replace)
    return False
