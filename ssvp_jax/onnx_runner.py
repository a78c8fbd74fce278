"""Runs an ONNX model exported by `python -m ssvp_jax.export --format=onnx` with onnxruntime or OpenVINO.

Needs numpy, PIL and one runtime (onnxruntime, or openvino, which reads the ONNX file directly) - no
jax, no ssvp_jax. This file stands alone with `runner_io.py`: copy both next to the model and run

    python onnx_runner.py model.onnx photo.jpg more/*.png                       # CSV on stdout
    python onnx_runner.py model.onnx photo.jpg --engine openvino                # OpenVINO, float32
    python onnx_runner.py model.onnx photo.jpg --engine openvino --precision bf16

or from Python:

    from onnx_runner import OnnxModel, read_image
    model = OnnxModel("model.onnx", engine="onnxruntime")
    out = model(np.stack([read_image(p, model.input_size) for p in paths]))  # {"map", "score", ...}

The CSV (path, score, decision, max_value) and the input conventions are those of
`jaxexport_runner.py`. Engines:
  onnxruntime  CPU execution provider, all graph optimisations. On a busy CPU, small models run faster
               with options={"session.intra_op.allow_spinning": "0"} (docs/deployment.md).
  openvino     CPU plugin. Its default on AMX-capable CPUs is bfloat16 even for a float32 model, so
               --precision f32 (the default) sets INFERENCE_PRECISION_HINT=f32 for float32 results;
               --precision bf16 asks for bfloat16 (faster, scores differ by ~1e-2).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

import numpy as np

try:  # standalone: runner_io.py copied next to this file
  from runner_io import Artifact, as_float_batch, cli_parser, read_image, score_to_csv
except ImportError:
  from ssvp_jax.runner_io import Artifact, as_float_batch, cli_parser, read_image, score_to_csv

__all__ = ["OnnxModel", "read_image", "main", "ENGINES"]

FORMAT = "ssvp_jax.onnx/1"
ENGINES = ("onnxruntime", "openvino")
PRECISIONS = ("f32", "bf16")
OUTPUTS = ("map", "score", "s_global", "s_local")
ORT_LEVELS = {"disable": "DISABLE_ALL", "basic": "ENABLE_BASIC", "extended": "ENABLE_EXTENDED", "all": "ENABLE_ALL"}


class OnnxModel(Artifact):
  """An exported SSVP ONNX model on one engine: call it on a batch; `meta` holds sizes, category, thresholds."""

  def __init__(self, path: str, engine: str = "onnxruntime", precision: str = "f32", threads: int | None = None,
               options: dict[str, str] | None = None):
    """options: engine settings beyond threads (docs/deployment.md). onnxruntime: "graph_optimization_level"
    (disable|basic|extended|all), "inter_op_num_threads", else session config entries such as
    "session.intra_op.allow_spinning"; OpenVINO: compile properties such as "PERFORMANCE_HINT"."""
    if engine not in ENGINES:
      raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if precision not in PRECISIONS:
      raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if engine == "onnxruntime" and precision != "f32":
      raise ValueError("onnxruntime runs the model in float32 only; bf16 is an OpenVINO option")
    level = (options or {}).get("graph_optimization_level", "all")
    if engine == "onnxruntime" and level not in ORT_LEVELS:  # checked here: load errors read "not an ONNX model"
      raise ValueError(f"graph_optimization_level must be one of {', '.join(ORT_LEVELS)}, got {level!r}")
    if not os.path.isfile(path):
      raise ValueError(f"{path}: no such file")
    self.engine, self.precision = engine, precision
    load = self._load_onnxruntime if engine == "onnxruntime" else self._load_openvino
    try:
      load(path, precision, threads, dict(options or {}))
    except ImportError:
      raise  # the runtime is not installed: say so, not "not an ONNX model"
    except Exception as e:  # noqa: BLE001  (each runtime has its own error types)
      raise ValueError(f"{path}: not an ONNX model {engine} can load ({type(e).__name__}: {e})") from None
    if self.meta.get("format") != FORMAT:
      raise ValueError(f"{path}: format {self.meta.get('format')!r}, this runner reads {FORMAT!r}")

  def _load_onnxruntime(self, path: str, precision: str, threads: int | None, options: dict[str, str]) -> None:
    del precision  # float32 only (checked above)
    import onnxruntime as ort
    opts = ort.SessionOptions()
    level = options.pop("graph_optimization_level", "all")
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_{ORT_LEVELS[level]}")
    opts.log_severity_level = 3  # no warnings about initializers the optimiser drops
    if threads:
      opts.intra_op_num_threads = threads
    if "inter_op_num_threads" in options:
      opts.inter_op_num_threads = int(options.pop("inter_op_num_threads"))
    for key, value in options.items():
      opts.add_session_config_entry(key, str(value))
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    self.meta = json.loads(session.get_modelmeta().custom_metadata_map.get("ssvp_jax", "{}"))
    names = [o.name for o in session.get_outputs()]
    self._call = lambda x: dict(zip(names, session.run(names, {"images": x})))

  def _load_openvino(self, path: str, precision: str, threads: int | None, options: dict[str, str]) -> None:
    import openvino as ov
    core = ov.Core()
    model = core.read_model(path)
    info = model.get_rt_info()
    self.meta = json.loads(model.get_rt_info(["framework", "ssvp_jax"]).astype(str)) if (
        "framework" in info.keys()) else {}
    config = {"INFERENCE_PRECISION_HINT": precision}
    if threads:
      config["INFERENCE_NUM_THREADS"] = threads
    config.update(options)
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()

    def call(x):
      res = request.infer({"images": x})
      return {k.get_any_name(): np.array(v) for k, v in res.items()}
    self._call = call

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """images [b, S, S, 3] (or one [S, S, 3]) -> {"map": [b, M, M], "score", "s_global", "s_local": [b]}."""
    out = self._call(np.ascontiguousarray(as_float_batch(images, self.input_size)))
    return {k: out[k] for k in OUTPUTS}


def main(argv: Sequence[str] | None = None) -> int:
  p = cli_parser("Scores image files with an exported SSVP ONNX model (CSV on stdout).", "the .onnx file")
  p.add_argument("--engine", choices=ENGINES, default="onnxruntime")
  p.add_argument("--precision", choices=PRECISIONS, default="f32",
                 help="OpenVINO's inference precision (f32 for float32 parity; bf16 is faster, less exact)")
  p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the runtime's)")
  args = p.parse_args(argv)
  model = OnnxModel(args.model, args.engine, args.precision, args.threads)
  return score_to_csv(model, args.images, args.batch_size)


if __name__ == "__main__":
  sys.exit(main())
