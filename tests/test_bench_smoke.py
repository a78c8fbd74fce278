"""The benchmark scripts run end to end on tiny models (so they cannot rot), and their
arithmetic (FLOP counts, chip peaks) is right. Timings themselves are not asserted."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_backbones  # noqa: E402
import bench_gpu  # noqa: E402
import bench_inference  # noqa: E402
import common  # noqa: E402


def test_backbones_smoke(capsys):
  rows = bench_backbones.run(bench_backbones.parse(["--smoke"]))
  assert [r["model"] for r in rows] == [common.SPECS["clip_tiny"].name, common.SPECS["dino_tiny"].name]
  for r in rows:
    assert r["torch_ips"] > 0 and r["jax_ips"] > 0
    assert r["ratio"] == pytest.approx(r["jax_ips"] / r["torch_ips"])
  out = capsys.readouterr().out
  assert "| CLIP tiny @56 |" in out and "ours / PyTorch" in out and "load average" in out


def test_same_weights_same_outputs():
  """The pair the benchmark times computes the same function (so the race is fair)."""
  import torch
  for key in ("clip_tiny", "dino_tiny"):
    spec = common.SPECS[key]
    hf, state = common.torch_model(spec)
    ours = common.flax_forward(spec, common.flax_model(spec, hf, state))
    x = np.random.default_rng(0).standard_normal((1, spec.size, spec.size, 3)).astype(np.float32)
    with torch.no_grad():
      ref = common.torch_forward(spec, hf)(torch.from_numpy(x.transpose(0, 3, 1, 2))).hidden_states
    hidden, _ = ours(jnp.asarray(x))
    for tap, h in zip(spec.taps, hidden):
      np.testing.assert_allclose(np.asarray(h), ref[tap].numpy(), atol=1e-4, rtol=0)


def test_analytic_flops_match_xla():
  """Spec.flops (matmuls + attention) against XLA's count of the compiled forward; XLA also
  counts the elementwise work (LayerNorm, softmax, GELU), a few percent at this width."""
  for kind in ("clip", "dinov3"):
    spec = common.Spec("t", kind, 128, 2, 2, 512, 16, 112, registers=2)
    hf, state = common.torch_model(spec)
    model = common.flax_model(spec, hf, state)
    from flax import nnx
    graphdef, st = nnx.split(model)
    flops = common.xla_flops(lambda s, x: nnx.merge(graphdef, s).encode_image(x, layers=spec.taps),
                             st, jnp.zeros((1, 112, 112, 3)))
    assert spec.flops() <= flops <= 1.15 * spec.flops(), (kind, spec.flops(), flops)


def test_inference_smoke(capsys):
  r = bench_inference.main(["--smoke"])
  assert r["config"] == "tiny" and r["ips"] > 0 and 0 < r["frac"]
  assert r["xla_flops"] and r["xla_flops"] >= r["analytic_flops"] > 0  # the heads add to the backbones
  assert "fraction of peak" in capsys.readouterr().out


def test_inference_engines_smoke(capsys):
  """Each engine in its own process, interleaved rounds; settings per engine; parity with JAX."""
  for mod in ("onnxruntime", "openvino", "jax2onnx", "nncf"):
    pytest.importorskip(mod)
  specs = ["jax", "onnxruntime/spin=0/opt=basic", "openvino_f32", "openvino_int8", "torch"]
  rows = bench_inference.main(["--smoke", "--engines", ",".join(specs)])
  by = {r["engine"]: r for r in rows}
  assert list(by) == specs and all(r["ips"] > 0 and len(r["times"]) == 3 and r["peak_gb"] > 0 for r in rows)
  assert by[specs[1]]["d_score"] < 1e-4 and by["openvino_f32"]["d_map"] < 1e-4  # float32 parity
  assert 0 < by["openvino_int8"]["d_map"] < 0.5  # int8 differs, but computes the same map
  assert by["torch"]["d_score"] is None and by["jax"]["vs_jax"] == 1.0 and by["torch"]["vs_torch"] == 1.0
  assert by["jax"]["vs_torch"] == pytest.approx(common.median(
      [t / j for t, j in zip(by["torch"]["times"], by["jax"]["times"])]))
  assert "(own process)" in capsys.readouterr().out


def test_engine_specs():
  assert bench_inference.parse_engine("onnxruntime/spin=0/inter=2") == ("onnxruntime", {"spin": "0", "inter": "2"})
  assert bench_inference.onnx_options("onnxruntime", {"spin": "0", "opt": "basic", "threads": "1"}) == {
      "session.intra_op.allow_spinning": "0", "graph_optimization_level": "basic"}
  with pytest.raises(ValueError, match="unknown engine 'tensorrt'"):
    bench_inference.parse_engine("tensorrt")
  with pytest.raises(ValueError, match="'spin=0' is not KEY=VALUE with KEY one of threads, xla"):
    bench_inference.parse_engine("jax/spin=0")
  with pytest.raises(SystemExit):
    bench_inference.parse(["--smoke", "--engines", "onnxruntime/spin"])


def test_memory_guard_kills_and_reports():
  """An engine process that grows past the limit is killed and named, not left to take the machine."""
  guard = common.MemoryGuard(0.3)
  grow = "import sys, time; x = bytearray(600 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(30)"
  child = common.Child([sys.executable, "-c", grow], None, guard)
  with pytest.raises(common.ChildFailed, match="memory guard"):
    child.ready()
  child.close()
  with common.Child([sys.executable, "-c", "print('ready'); import sys; sys.stdin.readline()"], None,
                    common.MemoryGuard(8)) as ok:
    ok.ready()


def test_precision_smoke(capsys):
  """bench_precision: every engine scores the held-out images; float32 ONNX keeps JAX's AUROCs."""
  for mod in ("onnxruntime", "openvino", "jax2onnx", "nncf"):
    pytest.importorskip(mod)
  import bench_precision
  rows = bench_precision.main(["--smoke", "--engines", "jax,onnxruntime,openvino_bf16,openvino_int8"])
  by = {r["engine"]: r for r in rows}
  assert list(by) == ["jax", "onnxruntime", "openvino_bf16", "openvino_int8"]
  assert by["onnxruntime"]["d_score"] < 1e-4 and by["onnxruntime"]["d_i"] == 0 and by["jax"]["d_score"] == 0
  assert all(0 <= r["i_auroc"] <= 1 and 0 <= r["p_auroc"] <= 1 and r["s_img"] > 0 for r in rows)
  assert 0 < by["openvino_bf16"]["d_map"] < 0.1 and 0 < by["openvino_int8"]["d_map"] < 0.5
  assert "mean over 1 categories (dots)" in capsys.readouterr().out


def test_gpu_script_without_gpu():
  if jax.devices()[0].platform == "gpu":
    pytest.skip("a GPU is present")
  with pytest.raises(SystemExit, match="no GPU visible"):
    bench_gpu.main([])


def test_gpu_peaks():
  assert bench_gpu.chip_peak("NVIDIA H200") == 989e12
  assert bench_gpu.chip_peak("NVIDIA H100 PCIe") == 756e12
  assert bench_gpu.chip_peak("NVIDIA A100-SXM4-80GB") == 312e12
  assert bench_gpu.chip_peak("cpu") is None
