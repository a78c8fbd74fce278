"""ssvp_jax: SSVP zero-shot industrial anomaly detection in JAX/Flax NNX."""

__version__ = "0.1.0"
