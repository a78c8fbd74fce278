"""Frozen backbones (CLIP, DINOv3) and the trainable SSVP heads."""
