"""A portable, self-contained inference artifact: the whole model as one `jax.export` function.

    python -m ssvp_jax.export --workdir=runs/demo --out=runs/demo/model.jaxexport [--size=224]
    python -m ssvp_jax.jaxexport_runner runs/demo/model.jaxexport photo.jpg     # needs only jax + numpy
    python -m ssvp_jax.export --workdir=runs/demo --out=runs/demo/model.onnx --format=onnx   # see onnx_export

The exported function takes RGB images `float32 [b, S, S, 3]` with values in [0, 1] (b symbolic: any
batch size; S = --size, default config.backbones.semantic.image_size) and computes everything the Python model does:
bicubic resizing to each backbone's input size, normalisation, CLIP and DINOv3, the heads (T_init of
the chosen category baked in as a constant, so no text tower), the upsampled and smoothed map and the
scores, fused with the category's reference bank when calibrate stored one (its arrays travel as
weights; --no_reference leaves it out). It returns {"map": [b, M, M], "score", "s_global", "s_local": [b]} with M =
config.backbones.semantic.image_size, the map size of evaluation and predict.

The resizing inside is PIL's antialiased bicubic filter written as two matrices, so for an image that
is already S x S the exported scores equal `predict`'s to float tolerance; other sizes are first
resized to S by the loader (one resampling more than predict does).

File format (`.jaxexport`): an uncompressed NumPy .npz archive holding
  function  uint8  the serialised `jax.export.Exported` (StableHLO; CPU and, where it lowers, CUDA)
  meta      uint8  UTF-8 JSON: input size, map size, category, thresholds from calibration.json, ...
  w0000...  the weights, passed to the function as its first argument (a list, in this order)
Weights travel as arguments, not constants, so a full-size model (about 2.4 GB) stays clear of the
2 GB limit of serialised modules.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssvp_jax import __version__, calibrate, evaluate, fileio, inference, reference

log = logging.getLogger("ssvp_jax")

FORMAT = "ssvp_jax.jaxexport/1"
DEFAULT_PLATFORMS = ("cpu", "cuda")


def _bicubic(x: np.ndarray) -> np.ndarray:
  """PIL's bicubic kernel (a = -0.5), support 2."""
  a = -0.5
  x = np.abs(x)
  return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                  np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0))


def pil_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] matrix R with R @ row == PIL's bicubic resize of a float row (mode "F").

  PIL (Resample.c, precompute_coeffs) widens the kernel by the scale when reducing (antialiasing),
  centres output pixel i at (i + 0.5) * scale, clips the taps to the image and normalises them.
  """
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = 2.0 * filterscale
  r = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = (i + 0.5) * scale
    lo = max(int(center - support + 0.5), 0)         # C's (int) truncation; clamped at 0 anyway
    hi = min(int(center + support + 0.5), in_size)
    taps = _bicubic((np.arange(lo, hi) - center + 0.5) / filterscale)
    total = taps.sum()
    r[i, lo:hi] = taps / total if total != 0.0 else taps
  return r


def _resize(images: jax.Array, matrix: np.ndarray) -> jax.Array:
  """[b, S, S, 3] -> [b, S', S', 3] with one [S', S] matrix on both axes, clipped to [0, 1] (as resize_image)."""
  if matrix.shape[0] == matrix.shape[1]:
    return images  # PIL and resize_image leave a same-size image untouched
  m = jnp.asarray(matrix, jnp.float32)
  out = jnp.einsum("oh,bhwc,pw->bopc", m, images, m, precision=jax.lax.Precision.HIGHEST)
  return jnp.clip(out, 0.0, 1.0)


def _exported_weight(path: tuple, value: Any) -> bool:
  # The text tower and the prompt vectors only make T_init, which is baked in: leave them out.
  return isinstance(value, nnx.Param) and tuple(path[:3]) != ("backbones", "semantic", "text") and path[0] != "prompts"


def inference_function(engine: inference.Engine, input_size: int
                       ) -> tuple[Callable[[list[jax.Array], jax.Array], dict[str, jax.Array]], list[jax.Array]]:
  """(fn, weights): fn(weights, images [b, S, S, 3] float32 in [0, 1]) -> map and scores; pure JAX.

  This is the function `export_model` serialises; calling it directly is "the Python model". With a
  reference bank on the engine, the bank's arrays are weights too (after the model's), and "map" and
  "score" are fused with it as `inference.Engine.forward` does; "bank_score" is the bank's own score.
  """
  graphdef, weights, rest = nnx.split(engine.model, _exported_weight, ...)
  leaves, treedef = jax.tree.flatten(weights)
  n_model = len(leaves)
  bank_leaves, bank_def = jax.tree.flatten(engine.bank)  # no leaves without a bank
  spec = reference.spec(engine.config)
  weight = float(reference.settings(engine.config).weight)
  matrices = [pil_bicubic_matrix(input_size, v.size) for v in engine.views]
  stats = [(np.asarray(v.mean, np.float32), np.asarray(v.std, np.float32)) for v in engine.views]
  t_init = np.asarray(engine.t_init)  # [P, E]
  map_size, sigma = engine.map_size, engine.sigma

  def fn(weight_leaves: list[jax.Array], images: jax.Array) -> dict[str, jax.Array]:
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, weight_leaves[:n_model]), rest)
    semantic, structural = ((_resize(images, m) - mean) / std for m, (mean, std) in zip(matrices, stats))
    t = jnp.broadcast_to(t_init, (images.shape[0],) + t_init.shape)  # [b, P, E]
    if not bank_leaves:
      amap, s_global, s_local, s_final = evaluate.eval_step(model, semantic, structural, t, map_size, sigma)  # [b, M, M]
      return {"map": amap, "score": s_final, "s_global": s_global, "s_local": s_local}
    bank = jax.tree.unflatten(bank_def, weight_leaves[n_model:])
    (amap, s_global, s_local, s_final), ((bmap, bscore),), _ = reference.step(
        model, semantic, structural, t, (bank,), spec=spec, size=map_size, sigma=sigma)
    return {"map": reference.fuse(amap, bmap, weight), "score": reference.fuse(s_final, bscore, weight),
            "s_global": s_global, "s_local": s_local, "bank_score": bscore}

  return fn, leaves + bank_leaves


def _storable(x: jax.Array) -> tuple[np.ndarray, str]:
  """(array NumPy can save without pickle, dtype name); ml_dtypes (bfloat16, ...) travel as raw bits."""
  a = np.asarray(x)
  if a.dtype.kind == "V":
    return a.view(np.dtype(f"u{a.dtype.itemsize}")), a.dtype.name
  return a, a.dtype.name


def artifact_meta(engine: inference.Engine, size: int, calibration: dict[str, Any] | None) -> dict[str, Any]:
  """What an artifact (.jaxexport or ONNX) says about itself: sizes, category, views, thresholds."""
  meta = {
      "format": FORMAT, "ssvp_jax_version": __version__, "jax_version": jax.__version__,
      "input_size": size, "input": "float32 [b, S, S, 3] RGB in [0, 1]",
      "map_size": engine.map_size, "outputs": ["map", "score", "s_global", "s_local"],
      "score": "S_final (Eq. 19)", "category": engine.category,
      "class_words": engine.config.class_words, "sigma": engine.sigma, "checkpoint_step": engine.step,
      "views": [{"name": v.name, "size": v.size, "mean": list(v.mean), "std": list(v.std)} for v in engine.views],
      "image_threshold": None, "pixel_threshold": None,
      "reference": None if engine.bank is None else {
          k: engine.bank_meta.get(k) for k in ("num_references", "weight", "fingerprint")}}
  if engine.bank is not None:
    meta["outputs"].append("bank_score")
    meta["score"] = "S_final (Eq. 19) fused with the reference bank's score (ssvp_jax/reference.py)"
  if calibration:
    if calibration.get("category") not in (None, engine.category):
      log.warning("calibration.json was made for category %r, exporting %r: thresholds left out",
                  calibration.get("category"), engine.category)
    else:
      meta.update(image_threshold=calibration["image_threshold"], pixel_threshold=calibration["pixel_threshold"])
  return meta


def export_model(engine: inference.Engine, out_path: str, input_size: int | None = None,
                 platforms: Sequence[str] = DEFAULT_PLATFORMS, calibration: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
  """Exports the engine's model (for its category) to `out_path`; returns the artifact's meta."""
  size = int(input_size or engine.map_size)
  fn, weights = inference_function(engine, size)
  (b,) = jax.export.symbolic_shape("b")
  args = ([jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights],
          jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32))
  platforms = tuple(platforms)
  try:
    exported = jax.export.export(jax.jit(fn), platforms=platforms)(*args)
  except Exception as e:  # noqa: BLE001  (lowering errors of another platform have no common type)
    if platforms == ("cpu",):
      raise
    log.warning("export for %s failed (%s: %s); exporting for CPU only", ",".join(platforms), type(e).__name__, e)
    platforms = ("cpu",)
    exported = jax.export.export(jax.jit(fn), platforms=platforms)(*args)
  unused = len(weights) - len(exported.module_kept_var_idx) + 1  # + 1: the images argument
  if unused:
    log.warning("%d exported weights are not used by the function", unused)
  meta = artifact_meta(engine, size, calibration)
  meta.update(platforms=list(exported.platforms), num_weights=len(weights))
  arrays = {"function": np.frombuffer(bytes(exported.serialize()), np.uint8)}
  meta["weight_dtypes"] = []
  for i, w in enumerate(weights):
    arrays[f"w{i:04d}"], name = _storable(w)
    meta["weight_dtypes"].append(name)
  arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  folder = os.path.dirname(os.path.abspath(out_path))
  os.makedirs(folder, exist_ok=True)
  with fileio.atomic_file(out_path, "wb") as f:  # a file object: np.savez would append ".npz" to a path
    np.savez(f, **arrays)
  log.info("exported %s (%s, %d weights, %.1f MB)", out_path, ",".join(meta["platforms"]), len(weights),
           os.path.getsize(out_path) / 1e6)
  return meta


def is_artifact(path: str) -> bool:
  """Whether `path` is a `.jaxexport` file (what --overwrite may replace)."""
  try:
    with zipfile.ZipFile(path) as z:
      return {"function.npy", "meta.npy"} <= set(z.namelist())
  except (OSError, zipfile.BadZipFile):
    return False


def main(argv) -> int:
  del argv
  from ssvp_jax.cli import FLAGS, setup  # importing cli defines the command-line flags: entry points only
  setup()
  if FLAGS.format == "onnx":
    from ssvp_jax import onnx_export  # imports this module
    fileio.check_output(FLAGS.out, FLAGS.overwrite, "ONNX model", onnx_export.is_onnx_model, folder=False)
  else:
    fileio.check_output(FLAGS.out, FLAGS.overwrite, ".jaxexport artifact", is_artifact, folder=False)
  cal = calibrate.load_calibration(FLAGS.workdir)
  category = FLAGS.category if FLAGS["category"].present or not cal else cal.get("category", FLAGS.category)
  engine = inference.load_engine(FLAGS.workdir, category, FLAGS.config, use_reference=not FLAGS.no_reference)
  if FLAGS.format == "onnx":
    from ssvp_jax import onnx_export  # imports this module
    meta = onnx_export.export_onnx(engine, FLAGS.out, FLAGS.size, cal)
    where = f"ONNX opset {meta['opset']}, checkpoint {meta['checkpoint_fingerprint']}"
  else:
    meta = export_model(engine, FLAGS.out, FLAGS.size, [p for p in FLAGS.platforms.split(",") if p], cal)
    where = f"platforms {','.join(meta['platforms'])}"
  thr = "" if meta["image_threshold"] is None else f", image threshold {meta['image_threshold']:.6g}"
  print(f"wrote {FLAGS.out}: input float32 [b, {meta['input_size']}, {meta['input_size']}, 3] in [0, 1], "
        f"{where}, category {meta['category']!r}{thr}")
  return 0


if __name__ == "__main__":
  from absl import flags

  import ssvp_jax.cli  # --config, --workdir, --verbose; run()
  flags.DEFINE_string("out", None, "Artifact path, e.g. model.jaxexport or model.onnx.", required=True)
  flags.DEFINE_bool("overwrite", False, "Replace --out when it is an existing artifact of the same format.")
  flags.DEFINE_enum("format", "jaxexport", ["jaxexport", "onnx"], "jaxexport: jax.export artifact (runs with "
                    "jax); onnx: ONNX model for onnxruntime / OpenVINO (needs the [onnx] extra).")
  flags.DEFINE_string("category", inference.DEFAULT_CATEGORY, "Category word baked into the prompts "
                      "(default 'object', or the calibrated one).")
  flags.DEFINE_bool("no_reference", False, "Leave the category's stored reference bank out (zero-shot only).")
  flags.DEFINE_integer("size", None, "Input side S of the exported function (default config.backbones.semantic.image_size).")
  flags.DEFINE_string("platforms", ",".join(DEFAULT_PLATFORMS), "Comma-separated jax.export platforms; "
                      "if one fails to lower, CPU only.")
  ssvp_jax.cli.run(main)
