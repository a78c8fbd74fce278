"""DINOv3 ViT image encoder in Flax NNX (frozen backbone, inference only).

Matches transformers' `DINOv3ViTModel` in eval mode: a conv patch embedding, a
CLS token and register tokens prepended to the patch tokens, pre-norm blocks
with LayerScale, q/k/v projections (no key bias in the released models), 2-D
RoPE on the patch tokens only, an exact-GELU MLP (or a gated one for the "+"
and 7B variants), and a final LayerNorm. The token order is
[CLS, registers..., patches (row-major)].

RoPE at inference (its coordinate augmentations run only in training): patch
centres ((i + 0.5) / n) * 2 - 1 per axis, so the grid spans [-1, 1] in both
directions whatever the image size; angles 2*pi*coord*theta^(-4k/head_dim) for
k < head_dim/4, the y angles then the x angles, tiled twice to head_dim, and
applied with the half-split rotation x*cos + rotate_half(x)*sin.

`mask_token` of the PyTorch model is deliberately absent: it only replaces
masked patches during iBOT training. The converter drops it by name.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from ssvp_jax.models import attention, bundle, dense
from ssvp_jax.models.backbone import IMAGENET_MEAN, IMAGENET_STD, Encoded

Array = jax.Array
_ACTIVATIONS = ("gelu", "silu")


@dataclasses.dataclass(frozen=True)
class DINOv3Config:
  """Architecture of a DINOv3 ViT; field names follow the meaning of transformers' config.

  `hidden_act` is the MLP activation: "gelu" is the exact (erf) GELU of the
  plain MLP; the gated variants released by Meta use "silu" (SwiGLU).
  """
  hidden_size: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  intermediate_size: int = 4096
  patch_size: int = 16
  num_channels: int = 3
  num_register_tokens: int = 4
  rope_theta: float = 100.0
  layer_norm_eps: float = 1e-5
  use_gated_mlp: bool = False
  hidden_act: str = "gelu"
  query_bias: bool = True
  key_bias: bool = False
  value_bias: bool = True
  proj_bias: bool = True
  mlp_bias: bool = True

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.head_dim % 4:
      # 2-D RoPE gives each axis a quarter of the head's dimensions.
      raise ValueError(f"head_dim {self.head_dim} (hidden_size / num_heads) must be divisible by 4 for 2-D RoPE")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {_ACTIVATIONS}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def num_prefix_tokens(self) -> int:
    """CLS + registers: the tokens before the patches, which RoPE leaves alone."""
    return 1 + self.num_register_tokens

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "DINOv3Config":
    """Inverse of `to_dict`; unknown keys are an error (a bundle from other code)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown DINOv3Config fields: {', '.join(unknown)}")
    return cls(**d)

  @classmethod
  def vitl16(cls) -> "DINOv3Config":
    """ViT-L/16 as in facebook/dinov3-vitl16-pretrain-lvd1689m (the SSVP backbone)."""
    return cls(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, patch_size=16,
               num_register_tokens=4, use_gated_mlp=False, hidden_act="gelu")

  @classmethod
  def tiny(cls) -> "DINOv3Config":
    """An 80k-parameter model for tests (odd sizes on purpose)."""
    return cls(hidden_size=60, num_layers=3, num_heads=3, intermediate_size=100, patch_size=4,
               num_register_tokens=2)


@struct.dataclass
class DINOv3Output:
  """Encoder outputs, tokens ordered [CLS, R registers, N patches].

  hidden_states: one [B, 1 + R + N, D] per requested layer index l, in the
    order requested: the residual stream after block l, un-normalised
    (transformers' `hidden_states[l]`).
  last_hidden_state: [B, 1 + R + N, D], the last block's output after the final
    LayerNorm (transformers' `last_hidden_state`); [:, 0] is the global CLS feature.
  """
  hidden_states: tuple[Array, ...]
  last_hidden_state: Array


@functools.lru_cache(maxsize=64)
def rope_tables(grid_h: int, grid_w: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
  """(sin, cos), each [grid_h * grid_w, head_dim] float32, for a patch grid.

  Computed in float32 with transformers' operation order; depends only on
  static shapes, so it is NumPy and cached, and a constant under jit.
  """
  inv_freq = (1.0 / np.float32(theta) ** (np.arange(head_dim // 4, dtype=np.float32) * np.float32(4.0 / head_dim)))
  ys = (np.arange(grid_h, dtype=np.float32) + np.float32(0.5)) / np.float32(grid_h)
  xs = (np.arange(grid_w, dtype=np.float32) + np.float32(0.5)) / np.float32(grid_w)
  coords = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)  # [N, 2] (y, x)
  coords = np.float32(2.0) * coords - np.float32(1.0)  # patch centres in [-1, 1]
  angles = np.float32(2 * np.pi) * coords[:, :, None] * inv_freq[None, None, :]  # [N, 2, head_dim/4]
  angles = np.tile(angles.reshape(len(coords), -1), (1, 2))  # [N, head_dim]: (y, x) then (y, x) again
  sin, cos = np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)
  sin.setflags(write=False)  # cached and shared: nobody may edit them in place
  cos.setflags(write=False)
  return sin, cos


def _rotate_half(x: Array) -> Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Array, sin: Array, cos: Array, num_prefix: int) -> Array:
  """Rotates the patch tokens of x [B, T, H, Dh]; the first `num_prefix` tokens are left as they are."""
  prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
  sin, cos = sin[:, None, :], cos[:, None, :]  # [N, 1, Dh]: same for every head
  # In float32 whatever x's dtype (the tables stay float32): a bfloat16 rotation would round
  # the angle's sin/cos to 8 bits. Elementwise, so the cost is small.
  patches = (patches * cos + _rotate_half(patches) * sin).astype(x.dtype)
  return jnp.concatenate([prefix, patches], axis=1)


def _dense(d_in: int, d_out: int, use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
  # transformers' init (truncated normal, std 0.02); real weights are loaded over it.
  return dense.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.initializers.truncated_normal(0.02), rngs=rngs)


def _layer_norm(cfg: DINOv3Config, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Flax defaults to eps 1e-6; DINOv3 uses 1e-5. Two-pass variance as in PyTorch.
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self-attention with RoPE on the patch tokens."""

  def __init__(self, cfg: DINOv3Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.num_heads, self.head_dim, self.num_prefix = cfg.num_heads, cfg.head_dim, cfg.num_prefix_tokens
    self.q = _dense(d, d, cfg.query_bias, dtype, param_dtype, rngs)
    self.k = _dense(d, d, cfg.key_bias, dtype, param_dtype, rngs)
    self.v = _dense(d, d, cfg.value_bias, dtype, param_dtype, rngs)
    self.o = _dense(d, d, cfg.proj_bias, dtype, param_dtype, rngs)

  def __call__(self, x: Array, sin: Array, cos: Array) -> Array:
    b, t, _ = x.shape
    heads = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)  # [B, T, H, Dh]
    q = apply_rope(heads(self.q(x)), sin, cos, self.num_prefix)
    k = apply_rope(heads(self.k(x)), sin, cos, self.num_prefix)
    # jax.nn.dot_product_attention, or its faster CPU form (attention.py); scale 1/sqrt(Dh)
    out = attention.dot_product_attention(q, k, heads(self.v(x)))  # [B, T, H, Dh]
    return self.o(out.reshape(b, t, -1))


class Mlp(nnx.Module):
  """down(act(up(x))), or down(act(gate(x)) * up(x)) when gated."""

  def __init__(self, cfg: DINOv3Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.act = cfg.hidden_act
    self.gate = _dense(d, f, cfg.mlp_bias, dtype, param_dtype, rngs) if cfg.use_gated_mlp else None
    self.up = _dense(d, f, cfg.mlp_bias, dtype, param_dtype, rngs)
    self.down = _dense(f, d, cfg.mlp_bias, dtype, param_dtype, rngs)

  def _act(self, x: Array) -> Array:
    # Exact (erf) GELU: jax.nn.gelu defaults to the tanh approximation.
    return jax.nn.gelu(x, approximate=False) if self.act == "gelu" else jax.nn.silu(x)

  def __call__(self, x: Array) -> Array:
    h = self._act(self.gate(x)) * self.up(x) if self.gate is not None else self._act(self.up(x))
    return self.down(h)


class LayerScale(nnx.Module):
  """Per-channel residual branch scale."""

  def __init__(self, dim: int, *, param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: Array) -> Array:
    return x * self.scale[...].astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm transformer block: x + ls1(attn(norm1 x)), then + ls2(mlp(norm2 x))."""

  def __init__(self, cfg: DINOv3Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = _layer_norm(cfg, **kw)
    self.attn = Attention(cfg, **kw)
    self.ls1 = LayerScale(cfg.hidden_size, param_dtype=param_dtype)
    self.norm2 = _layer_norm(cfg, **kw)
    self.mlp = Mlp(cfg, **kw)
    self.ls2 = LayerScale(cfg.hidden_size, param_dtype=param_dtype)

  def __call__(self, x: Array, sin: Array, cos: Array) -> Array:
    x = x + self.ls1(self.attn(self.norm1(x), sin, cos))
    return x + self.ls2(self.mlp(self.norm2(x)))


class StructuralViT:
  """The encoder loop and SSVP's structural-backbone interface (ssvp_jax/models/backbone.py) of a
  DINO-style ViT (DINOv3, DINOv2): the class provides `cfg`, `embed`, `layers`, `norm` and
  `block_inputs(images)` (what each block takes besides the tokens)."""

  MEAN, STD = IMAGENET_MEAN, IMAGENET_STD

  def encode_image(self, images: Array, layers: Sequence[int] | None = None) -> DINOv3Output:
    """Runs the encoder on images [B, H, W, C] (H, W multiples of the patch size).

    `layers`: 1-based block indices whose outputs to return (0 is the
    embedding output), as in transformers' `hidden_states[l]`; None returns
    every block. Static: each distinct tuple compiles once under jit.
    """
    n = self.cfg.num_layers
    taps = tuple(range(1, n + 1)) if layers is None else tuple(int(l) for l in layers)
    bad = [l for l in taps if not 0 <= l <= n]
    if bad:
      raise ValueError(f"layers {bad} out of range: this model has blocks 1..{n} (0 = embeddings)")
    extra = self.block_inputs(images)
    x = self.embed(images)
    states = {0: x}
    for i, block in enumerate(self.layers):
      x = block(x, *extra)
      states[i + 1] = x
    return DINOv3Output(hidden_states=tuple(states[l] for l in taps), last_hidden_state=self.norm(x))

  def __call__(self, images: Array, layers: Sequence[int] | None = None) -> DINOv3Output:
    return self.encode_image(images, layers)

  def patch_tokens(self, hidden: Array) -> Array:
    """SSVP's local tokens: a tapped layer [B, 1 + R + N, D] -> final norm, CLS and registers dropped: [B, N, D]."""
    return self.norm(hidden)[:, self.cfg.num_prefix_tokens:]

  @property
  def patch_size(self) -> int:
    return self.cfg.patch_size

  @property
  def local_dim(self) -> int:
    return self.cfg.hidden_size

  global_dim = local_dim

  def encode(self, images: Array, layers: Sequence[int]) -> Encoded:
    """Each tap through the final norm without CLS and registers; the global feature is the CLS
    token after the final norm."""
    out = self.encode_image(images, layers=tuple(layers))
    return Encoded(local=tuple(self.patch_tokens(h) for h in out.hidden_states),
                   global_=out.last_hidden_state[:, 0])


def _random(hidden: int, layers: int, heads: int, mlp: int, patch: int, registers: int) -> DINOv3Config:
  return DINOv3Config(hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=mlp,
                      patch_size=patch, num_register_tokens=registers)


# Random-weight presets, named and gridded as ssvp_jax.models.clip.PRESETS (tiny: patch 4 at 16 px;
# small: patch 8 at 112 px; demo: ViT-B/16's shape at 224 px).
PRESETS = {
    "tiny": lambda: _random(32, 2, 2, 44, 4, 1),
    "small": lambda: _random(96, 4, 4, 256, 8, 2),
    "demo": lambda: _random(768, 12, 12, 3072, 16, 4),
}


class DINOv3(StructuralViT, nnx.Module):
  """DINOv3 ViT. `encode_image` is the entry point; `__call__` is the same."""

  def __init__(self, cfg: DINOv3Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    d, p = cfg.hidden_size, cfg.patch_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.patch_embed = nnx.Conv(cfg.num_channels, d, (p, p), strides=(p, p), padding="VALID",
                                kernel_init=nnx.initializers.truncated_normal(0.02), **kw)
    init = nnx.initializers.truncated_normal(0.02)
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d), param_dtype))
    self.register_tokens = nnx.Param(init(rngs.params(), (1, cfg.num_register_tokens, d), param_dtype))
    self.layers = nnx.List([Block(cfg, **kw) for _ in range(cfg.num_layers)])
    self.norm = _layer_norm(cfg, **kw)

  def embed(self, images: Array) -> Array:
    """images [B, H, W, C] (normalised) -> tokens [B, 1 + R + N, D] before the first block."""
    b, h, w, c = images.shape
    p = self.cfg.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    if c != self.cfg.num_channels:
      raise ValueError(f"images have {c} channels, the model takes {self.cfg.num_channels} (NHWC expected)")
    x = self.patch_embed(images.astype(self.dtype))  # [B, h, w, D]
    x = x.reshape(b, -1, x.shape[-1])  # [B, N, D], row-major like PyTorch's flatten(2)
    prefix = jnp.concatenate([self.cls_token[...], self.register_tokens[...]], axis=1).astype(x.dtype)
    return jnp.concatenate([jnp.broadcast_to(prefix, (b,) + prefix.shape[1:]), x], axis=1)

  def block_inputs(self, images: Array) -> tuple[Array, ...]:
    """The 2-D RoPE tables of the images' patch grid, which every block takes besides the tokens."""
    p = self.cfg.patch_size
    sin, cos = rope_tables(images.shape[1] // p, images.shape[2] // p, self.cfg.head_dim, self.cfg.rope_theta)
    return jnp.asarray(sin), jnp.asarray(cos)  # float32 (see apply_rope)


def param_count(cfg: DINOv3Config) -> int:
  """Number of parameters of the module for `cfg`, without allocating them."""
  return sum(int(np.prod(s)) for s in param_shapes(cfg).values())


def param_shapes(cfg: DINOv3Config) -> dict[str, tuple[int, ...]]:
  """{flat parameter name: shape} of the module for `cfg` (the bundle's keys), without allocating."""
  return bundle.param_shapes(nnx.eval_shape(lambda: DINOv3(cfg, rngs=nnx.Rngs(0))))


def load(bundle_dir: str, *, dtype=jnp.float32, param_dtype=jnp.float32) -> DINOv3:
  """Builds a DINOv3 from a bundle written by `convert/dinov3.py` (strict: every weight must fit).

  `dtype` is the compute dtype, `param_dtype` the storage dtype of the weights.
  """
  cfg_dict, flat = bundle.read_bundle(bundle_dir, "dinov3")
  cfg = DINOv3Config.from_dict(cfg_dict)
  model = bundle.zeros_module(lambda: DINOv3(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  bundle.assign_params(model, flat, source=bundle_dir)
  return model


def build(section, *, dtype, rngs: nnx.Rngs) -> DINOv3:
  """The registry's entry (ssvp_jax/models/registry.py): `section.bundle` or the preset `section.random_init`."""
  if section.bundle:
    return load(section.bundle, dtype=dtype)
  return DINOv3(PRESETS[section.random_init](), dtype=dtype, rngs=rngs)
