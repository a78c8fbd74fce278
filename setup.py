"""ssvp_jax: zero-shot industrial anomaly detection (SSVP) in JAX/Flax NNX."""

from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.7",
    "flax>=0.12.4",
    "optax",
    "orbax-checkpoint",
    "ml_collections",
    "numpy",
    "scipy",
    "scikit-learn",
    "scikit-image",
    "pillow",
    "safetensors",
    "tokenizers",
    "transformers",  # CLIPTokenizer only; torch is not needed at run time
    "grain",
    "tqdm",
    "tensorboardX",
    "absl-py",
    "flatbuffers",  # jax.export's serialisation format
]
CONVERT = ["torch==2.13.0", "safetensors", "transformers>=4.56"]
TEST = CONVERT + ["pytest", "pytest-xdist", "selenium==4.50.0"]  # selenium drives Debian's chromium (.ci/run)
# ONNX export and runtimes (issue 14). jax2onnx itself is installed apart, `pip install --no-deps
# jax2onnx==0.17.1`: its metadata pins orbax-checkpoint<0.11.37, which would downgrade ours, and it does not
# import orbax (or netron, orbax-export). These are what it and the runtimes import; nncf quantizes the
# OpenVINO model to int8 (bench/bench_precision.py, bench_inference.py's openvino_int8 / openvino_w8):
ONNX = ["onnx==1.23.2", "onnx-ir==1.1.0", "onnxruntime==1.32.0", "openvino==2026.4.1", "dm-pix==0.4.5",
        "equinox==0.13.8", "chex==0.1.92", "jaxtyping==0.3.11", "nncf==3.4.0"]

setup(
    name="ssvp_jax",
    version="0.1.0",
    description="SSVP zero-shot anomaly detection (CLIP + DINOv3) in JAX/Flax NNX",
    packages=find_packages(include=["ssvp_jax", "ssvp_jax.*", "configs"]),  # configs: `from configs import base`
    python_requires=">=3.11",
    install_requires=RUNTIME,
    extras_require={
        "convert": CONVERT,
        "test": TEST,
        "onnx": ONNX,
        "app": ["gradio==6.31.0"],  # python -m ssvp_jax.app
        "tfds": ["tensorflow-datasets>=4.9.10", "array_record>=0.8.6", "importlib_resources"],
        "cuda": ["jax[cuda12]"],
    },
)
