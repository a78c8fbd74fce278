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
TEST = CONVERT + ["pytest", "pytest-xdist"]

setup(
    name="ssvp_jax",
    version="0.1.0",
    description="SSVP zero-shot anomaly detection (CLIP + DINOv3) in JAX/Flax NNX",
    packages=find_packages(include=["ssvp_jax", "ssvp_jax.*"]),
    python_requires=">=3.11",
    install_requires=RUNTIME,
    extras_require={
        "convert": CONVERT,
        "test": TEST,
        "tfds": ["tensorflow-datasets>=4.9.10", "array_record>=0.8.6", "importlib_resources"],
        "cuda": ["jax[cuda12]"],
    },
)
