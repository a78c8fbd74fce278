"""PyTorch -> Flax weight converters (import torch; not needed at run time)."""
