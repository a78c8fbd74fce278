"""Accuracy of the deployment engines and precisions on held-out images (issue 14): I-AUROC and
P-AUROC of a trained model through JAX, onnxruntime and OpenVINO in float32, bfloat16 and int8.

    .venv/bin/python bench/bench_precision.py --workdir=runs/demo          # the demo's target categories
    .venv/bin/python bench/bench_precision.py --smoke                      # tiny random model (a test)

For each category of the held-out data (default WORKDIR/data/target, the demo's VisA-layout target
set), the trained model of the category word (zero-shot: no reference bank) is converted to ONNX
(`onnx_export.export_onnx`, or taken from --onnx_dir/<category>.onnx when there) and every test image
scored, read once with `runner_io.read_image` so that all engines see the same input arrays:
  jax            `export.inference_function` jitted (what predict computes; the reference)
  onnxruntime    the ONNX file, float32
  openvino_f32   OpenVINO CPU, INFERENCE_PRECISION_HINT=f32
  openvino_bf16  OpenVINO CPU, INFERENCE_PRECISION_HINT=bf16
  openvino_int8  NNCF post-training quantization (`nncf.quantize`, transformer preset) calibrated on
                 --calib good *training* images of the category; the rest in float32
  openvino_w8    NNCF int8 weight compression (`nncf.compress_weights`), float32 activations
Metrics (`ssvp_jax.metrics`): I-AUROC from the scores, P-AUROC from the maps against the masks
resized to the map (as evaluation does), per category and their mean; the change from JAX and the
largest score difference from JAX. The s/img column is timed in this one process with JAX loaded,
engines one after another: a rough guide only; bench_inference.py --engines measures speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ENGINES = ("jax", "onnxruntime", "openvino_f32", "openvino_bf16", "openvino_int8", "openvino_w8")


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default=None, help="a trained work directory (python -m ssvp_jax.train)")
  p.add_argument("--data", default=None, help="held-out data root in the VisA layout (default WORKDIR/data/target)")
  p.add_argument("--onnx_dir", default=None, help="where <category>.onnx are read from, or written when absent")
  p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated from {','.join(ENGINES)}")
  p.add_argument("--calib", type=int, default=8, help="good training images per category to calibrate int8 with")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--threads", type=int, default=None, help="CPUs to use (default: all)")
  p.add_argument("--smoke", action="store_true", help="tiny random model on 8 generated 32-px images (a test)")
  args = p.parse_args(argv)
  args.engines = args.engines.split(",")
  unknown = sorted(set(args.engines) - set(ENGINES))
  if unknown:
    p.error(f"--engines: unknown {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
  if "jax" not in args.engines:
    p.error("--engines: jax is the reference and must be among them")
  if not args.smoke and not args.workdir:
    p.error("--workdir is required (or --smoke)")
  if args.smoke:
    args.calib = min(args.calib, 2)
  return args


def records(root: str, split: str):
  """{category: [Record]} of one split of the VisA-layout data at `root`."""
  from ssvp_jax.data.datasets import read_dataset
  by = {}
  for r in read_dataset("visa", root, split):
    by.setdefault(r.category, []).append(r)
  return by


def engine_makers(threads: int, batch: int):
  """{engine: make(onnx_path, calibration images, jax engine, size) -> run(images) -> {"map", "score", ...}}."""
  import jax

  from ssvp_jax import export
  from ssvp_jax.onnx_runner import OnnxModel

  def make_jax(path, calib, engine, size):
    fn, weights = export.inference_function(engine, size)
    jitted, w = jax.jit(fn), jax.device_put(weights)
    return lambda x: jitted(w, x)

  def onnx(engine_name, precision):
    return lambda path, calib, engine, size: OnnxModel(path, engine_name, precision, threads)

  def int8(weights_only):
    return lambda path, calib, engine, size: common.openvino_int8(path, calib, threads, weights_only=weights_only,
                                                                  batch=batch)

  return {"jax": make_jax, "onnxruntime": onnx("onnxruntime", "f32"), "openvino_f32": onnx("openvino", "f32"),
          "openvino_bf16": onnx("openvino", "bf16"), "openvino_int8": int8(False), "openvino_w8": int8(True)}


def score(run, images, batch: int):
  """(maps [n, M, M], scores [n], seconds after one warm-up batch) of `run` over `images` in batches."""
  import numpy as np
  maps, scores = [], []
  common.block(run(images[:batch]))  # compilation and warm-up, not timed
  t0 = time.perf_counter()
  for i in range(0, len(images), batch):
    out = run(images[i:i + batch])
    maps.append(np.asarray(out["map"]))
    scores.append(np.asarray(out["score"]))
  return np.concatenate(maps), np.concatenate(scores), time.perf_counter() - t0


def smoke_setup(tmp: str):
  """(engine_for(category), data root): the tiny config's random model and a generated 32-px VisA set."""
  import bench_inference

  from ssvp_jax.data import synth
  root = os.path.join(tmp, "data")
  synth.generate("visa", root, ["dots"], size=32, num_good=3, num_anomalous=3, num_train=2, seed=1)
  _, _, engine = bench_inference.bench_model(bench_inference.parse(["--smoke"]))
  return (lambda category: engine), root


def main(argv=None):
  import numpy as np

  from ssvp_jax import metrics, onnx_export
  from ssvp_jax.data import pipeline
  from ssvp_jax.runner_io import read_image
  args = parse(argv)
  threads = common.pin_threads(args.threads)
  print(f"# SSVP engines' accuracy on held-out images, {'tiny random model' if args.smoke else args.workdir}; "
        f"{common.machine()}")
  print(f"# {common.load_avg()} (start)")
  makers = engine_makers(threads, args.batch)
  results = {e: {} for e in args.engines}  # engine -> category -> (I-AUROC, P-AUROC, max |d score|, s/img)
  failed = {}  # engine -> the first error
  with tempfile.TemporaryDirectory() as tmp:
    if args.smoke:
      engine_for, root = smoke_setup(tmp)
    else:
      from ssvp_jax import inference
      root = args.data or os.path.join(args.workdir, "data", "target")
      engine_for = lambda category: inference.load_engine(args.workdir, category, use_reference=False)
    test, train = records(root, "test"), records(root, "train")
    onnx_dir = args.onnx_dir or tmp
    os.makedirs(onnx_dir, exist_ok=True)
    for category in sorted(test):
      engine = engine_for(category)
      size = engine.map_size
      path = os.path.join(onnx_dir, f"{category}.onnx")
      if not os.path.exists(path):
        onnx_export.export_onnx(engine, path)
      recs = test[category]
      images = np.stack([read_image(r.image_path, size) for r in recs])
      calib = np.stack([read_image(r.image_path, size) for r in train.get(category, [])[:args.calib]])
      labels = np.asarray([r.label for r in recs])
      masks = np.stack([pipeline.resize_mask(pipeline.load_mask(r.mask_path), size) if r.mask_path
                        else np.zeros((size, size), bool) for r in recs])
      ref = None
      for e in args.engines:
        try:
          maps, scores, secs = score(makers[e](path, calib, engine, size), images, args.batch)
        except Exception as err:  # noqa: BLE001  (a runtime that cannot compile the model: a row, not the end)
          if e == "jax":
            raise
          failed.setdefault(e, f"{category}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
          print(f"# {category} {e}: FAILED {failed[e]}", flush=True)
          continue
        ref = (maps, scores) if e == "jax" else ref
        results[e][category] = (metrics.image_metrics(labels, scores)["auroc"],
                                metrics.pixel_metrics(masks, maps)["auroc"],
                                float(np.abs(scores - ref[1]).max()), float(np.abs(maps - ref[0]).max()),
                                secs / len(images))
        print(f"# {category} {e}: I-AUROC {100 * results[e][category][0]:.2f}, "
              f"P-AUROC {100 * results[e][category][1]:.2f}", flush=True)
  return report(results, failed)


def report(results: dict, failed: dict) -> list[dict]:
  """One row per engine: mean I-/P-AUROC over the categories, change from JAX, largest differences."""
  import numpy as np
  rows = []
  mean = lambda e, k: float(np.mean([v[k] for v in results[e].values()]))
  for e in failed:
    print(f"# {e} FAILED ({failed[e]}); its row is over the categories it scored")
  for e in [e for e in results if results[e]]:
    rows.append(dict(engine=e, i_auroc=mean(e, 0), p_auroc=mean(e, 1), d_i=mean(e, 0) - mean("jax", 0),
                     d_p=mean(e, 1) - mean("jax", 1), d_score=max(v[2] for v in results[e].values()),
                     d_map=max(v[3] for v in results[e].values()), s_img=mean(e, 4)))
  common.print_table(["engine", "I-AUROC", "P-AUROC", "d I-AUROC vs JAX", "d P-AUROC vs JAX", "max |d score| vs JAX",
                      "max |d map| vs JAX", "s/img (in-process)"],
                     [[r["engine"], f"{100 * r['i_auroc']:.2f}", f"{100 * r['p_auroc']:.2f}", f"{100 * r['d_i']:+.2f}",
                       f"{100 * r['d_p']:+.2f}", f"{r['d_score']:.1e}", f"{r['d_map']:.1e}", f"{r['s_img']:.4f}"]
                      for r in rows])
  cats = sorted(next(iter(results.values())))
  print(f"# mean over {len(cats)} categories ({', '.join(cats)}); AUROC in percent")
  print(f"# {common.load_avg()} (end)")
  return rows


if __name__ == "__main__":
  main()
