"""What several test modules share; no test module imports another one (tests/conftest.py has the fixtures).

  tiny      the tiny config (configs/tiny.py), its demo data and its trained work directory, the CLI runner
  hf_clip   a tiny offline CLIP tokenizer and a random transformers CLIPModel of odd sizes, plus the JAX twin
  hf_dinov2 / hf_dinov3   random transformers DINOv2 / DINOv3 models of odd sizes (test_<model> and test_convert_<model>)
  vit       what the DINO parity tests share: random ViT weights, images, outputs, the tolerance

A package rather than functions in conftest.py: test modules need these names at import time (parametrize
lists, module-level jitted functions), the sharding and multi-host tests' child processes import `tiny`
without pytest (and must not pay for torch), and pytest does not mean conftest.py to be imported. pytest's
default import mode puts tests/ on sys.path (no __init__.py there), so `from helpers.tiny import ...` works
in every test module, as it does in a child that puts tests/ on its path.
"""
