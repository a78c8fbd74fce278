"""OpenAI CLIP (vision + text towers) in Flax NNX, with AnomalyCLIP's value-value path.

The vision tower takes NHWC images of any size divisible by the patch size; the
learned position table is resized to the new grid as PyTorch does it (see
`resize.py`). `encode_image` taps the residual stream after chosen blocks
(1-based, equal to transformers' `hidden_states[l]`) and, optionally, runs
AnomalyCLIP's value-value attention side path on chosen blocks.

The text tower is OpenAI's causal transformer; `encode_text_embeds` takes token
embeddings so that a prompt learner can splice learnable vectors in.

Weights come from a bundle written by `convert/clip.py`: `load(bundle_dir)`.
Parameter paths (the bundle's keys) read like `vision.blocks.3.attn.q.kernel`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from ssvp_jax.models import attention, bundle, dense
from ssvp_jax.models.backbone import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Encoded
from ssvp_jax.models.resize import METHODS, resize_pos_table

ACTIVATIONS = ("quick_gelu", "gelu")
BYTE_VOCAB_SIZE = 2 * 256 + 2  # `byte_level_tokenizer()`: 256 bytes, the same ending a word, SOT, EOT


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: int  # native resolution: the position table is (image_size // patch_size)^2 + 1
  patch_size: int
  width: int
  layers: int
  heads: int
  mlp_dim: int
  hidden_act: str = "quick_gelu"  # OpenAI's x * sigmoid(1.702 x); "gelu" (exact) for comparisons
  layer_norm_eps: float = 1e-5
  pos_interpolation: str = "bilinear"  # AnomalyCLIP; "bicubic" as transformers/open_clip/Bayes-PFL

  def __post_init__(self):
    _check_tower(self, "vision")
    if self.image_size % self.patch_size:
      raise ValueError(f"vision: image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
    if self.pos_interpolation not in METHODS:
      raise ValueError(f"vision: pos_interpolation {self.pos_interpolation!r} not in {METHODS}")

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int
  context_length: int
  width: int
  layers: int
  heads: int
  mlp_dim: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    _check_tower(self, "text")


def _check_tower(c, name: str) -> None:
  if c.width % c.heads:
    raise ValueError(f"{name}: width {c.width} is not divisible by heads {c.heads}")
  if c.hidden_act not in ACTIVATIONS:
    raise ValueError(f"{name}: hidden_act {c.hidden_act!r} not in {ACTIVATIONS}")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  vision: VisionConfig
  text: TextConfig
  projection_dim: int

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
    try:
      return cls(vision=VisionConfig(**d["vision"]), text=TextConfig(**d["text"]),
                 projection_dim=int(d["projection_dim"]))
    except (KeyError, TypeError) as e:
      raise ValueError(f"not a CLIP config ({type(e).__name__}: {e}): {d}") from e

  def replace(self, **vision_overrides) -> "CLIPConfig":
    """A copy with vision fields changed, e.g. `cfg.replace(pos_interpolation="bicubic")`."""
    return dataclasses.replace(self, vision=dataclasses.replace(self.vision, **vision_overrides))


def vit_l14_336() -> CLIPConfig:
  """OpenAI ViT-L/14 at 336 px (the backbone SSVP, Bayes-PFL and AnomalyCLIP use)."""
  return CLIPConfig(
      vision=VisionConfig(image_size=336, patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096),
      text=TextConfig(vocab_size=49408, context_length=77, width=768, layers=12, heads=12, mlp_dim=3072),
      projection_dim=768)


def tiny(vocab_size: int = BYTE_VOCAB_SIZE) -> CLIPConfig:
  """A small CLIP for tests (odd widths, patch 7 on 28 px); its default vocabulary fits
  `byte_level_tokenizer()`."""
  return CLIPConfig(
      vision=VisionConfig(image_size=28, patch_size=7, width=60, layers=4, heads=3, mlp_dim=132),
      text=TextConfig(vocab_size=vocab_size, context_length=16, width=36, layers=3, heads=3, mlp_dim=76),
      projection_dim=20)


def _random_preset(text_width: int, context_length: int, text_layers: int, text_heads: int, text_mlp: int,
                   projection_dim: int, **vision) -> CLIPConfig:
  return CLIPConfig(
      vision=VisionConfig(**vision),
      text=TextConfig(vocab_size=BYTE_VOCAB_SIZE, context_length=context_length, width=text_width,
                      layers=text_layers, heads=text_heads, mlp_dim=text_mlp),
      projection_dim=projection_dim)


_DEMO_TEXT = dict(text_width=64, context_length=32, text_layers=2, text_heads=4, text_mlp=160, projection_dim=64)

# Random-weight presets (`config.backbones.semantic.random_init`) for runs without downloaded weights,
# with the byte-level tokenizer; each structural backbone has presets of the same names and token grid.
PRESETS = {
    # configs/tiny.py: patch 7 at 28 px, 4 x 4 tokens.
    "tiny": lambda: _random_preset(24, 24, 1, 2, 40, 20, image_size=28, patch_size=7, width=36, layers=2, heads=3,
                                   mlp_dim=52),
    # configs/demo.py: four 96-wide blocks, patch 8 at 112 px (14 x 14 tokens); the heads cost more.
    "small": lambda: _random_preset(**_DEMO_TEXT, image_size=112, patch_size=8, width=96, layers=4, heads=4,
                                    mlp_dim=256),
    # configs/demo_vitb.py: ViT-B/16's vision shape, where the frozen backbones cost far more than the
    # heads (as at full size), so the feature cache pays.
    "demo": lambda: _random_preset(**_DEMO_TEXT, image_size=224, patch_size=16, width=768, layers=12, heads=12,
                                   mlp_dim=3072),
}


# ----------------------------------------------------------------------------- layers


def activation(name: str, x: jax.Array) -> jax.Array:
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  return jax.nn.gelu(x, approximate=False)


class Attention(nnx.Module):
  """Multi-head self-attention with separate q/k/v projections (transformers' layout)."""

  def __init__(self, width: int, heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.heads = heads
    linear = lambda: dense.Linear(width, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q, self.k, self.v, self.out = linear(), linear(), linear(), linear()

  def __call__(self, h: jax.Array, *, causal: bool = False, value_value: bool = False
               ) -> tuple[jax.Array, jax.Array | None]:
    """h [B, T, D] (already layer-normed) -> (attention output, value-value output or None)."""
    split = lambda t: t.reshape(*t.shape[:-1], self.heads, -1)  # [B, T, H, Dh]
    merge = lambda t: t.reshape(*t.shape[:-2], -1)
    q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
    out = self.out(merge(attention.dot_product_attention(q, k, v, is_causal=causal)))
    if not value_value:
      return out, None
    # AnomalyCLIP's v-v attention: q = k = v = the value projection, same scale 1/sqrt(Dh).
    return out, self.out(merge(attention.dot_product_attention(v, v, v)))


class Block(nnx.Module):
  """Pre-LN residual block: x + attn(ln_1 x), then + mlp(ln_2 x)."""

  def __init__(self, width: int, heads: int, mlp_dim: int, act: str, eps: float, *,
               dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln_1 = nnx.LayerNorm(width, epsilon=eps, **kw)
    self.attn = Attention(width, heads, **kw)
    self.ln_2 = nnx.LayerNorm(width, epsilon=eps, **kw)
    self.fc1 = dense.Linear(width, mlp_dim, **kw)
    self.fc2 = dense.Linear(mlp_dim, width, **kw)
    self.act = act

  def __call__(self, x: jax.Array, *, causal: bool = False, value_value: bool = False
               ) -> tuple[jax.Array, jax.Array | None]:
    """x [B, T, D] -> (x after the block, value-value residual update or None)."""
    a, vv = self.attn(self.ln_1(x), causal=causal, value_value=value_value)
    x = x + a
    x = x + self.fc2(activation(self.act, self.fc1(self.ln_2(x))))
    return x, vv


def _blocks(c, dtype, param_dtype, rngs) -> nnx.List:
  return nnx.List([Block(c.width, c.heads, c.mlp_dim, c.hidden_act, c.layer_norm_eps,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(c.layers)])


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype))


# ----------------------------------------------------------------------------- towers


@struct.dataclass
class VisionOutput:
  """hidden_states: one [B, 1+N, width] per requested block (CLS first), in request order.
  image_embeds: ln_post(CLS of the last block) @ proj, [B, E].
  projected: with project_tokens=True, each tap through ln_post @ proj, [B, 1+N, E]."""
  hidden_states: tuple[jax.Array, ...]
  image_embeds: jax.Array
  projected: tuple[jax.Array, ...] | None = None


class VisionTower(nnx.Module):

  def __init__(self, c: VisionConfig, projection_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.config = c
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.patch_embed = nnx.Conv(3, c.width, (c.patch_size, c.patch_size), strides=c.patch_size,
                                padding="VALID", use_bias=False, **kw)
    std = c.width ** -0.5
    self.class_embedding = _normal(rngs, (c.width,), std, param_dtype)
    self.pos_embed = _normal(rngs, (c.grid * c.grid + 1, c.width), std, param_dtype)
    self.ln_pre = nnx.LayerNorm(c.width, epsilon=c.layer_norm_eps, **kw)
    self.blocks = _blocks(c, dtype, param_dtype, rngs)
    self.ln_post = nnx.LayerNorm(c.width, epsilon=c.layer_norm_eps, **kw)
    self.proj = _normal(rngs, (c.width, projection_dim), std, param_dtype)  # [D, E]

  def project(self, tokens: jax.Array) -> jax.Array:
    """ln_post then the visual projection: [..., D] -> [..., E]."""
    return self.ln_post(tokens) @ self.proj[...].astype(self.dtype)

  def __call__(self, images: jax.Array, layers: Sequence[int] = (), value_value_layers: Sequence[int] = (),
               project_tokens: bool = False) -> VisionOutput:
    c = self.config
    b, h, w, _ = images.shape
    if h % c.patch_size or w % c.patch_size:
      raise ValueError(f"image size {h}x{w} is not divisible by the patch size {c.patch_size}")
    layers, vv_layers = tuple(layers), frozenset(value_value_layers)
    for name, ls in (("layers", layers), ("value_value_layers", vv_layers)):
      bad = [l for l in ls if not 1 <= l <= c.layers]
      if bad:
        raise ValueError(f"{name} {sorted(bad)} out of range: blocks are numbered 1..{c.layers}")

    x = self.patch_embed(images.astype(self.dtype))  # [B, gh, gw, D]
    grid = x.shape[1:3]
    x = x.reshape(b, grid[0] * grid[1], c.width)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, c.width))
    pos = resize_pos_table(self.pos_embed[...], grid, c.pos_interpolation)  # [1+N, D]
    x = self.ln_pre(jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype))  # [B, 1+N, D]

    # AnomalyCLIP (SPEC.md section 1): x_vv starts as the ordinary stream entering the first
    # v-v block, then x_vv(l) = x_vv(l-1) + out_proj(softmax(v v^T / sqrt(Dh)) v), with v
    # from ln_1 of the ordinary stream; no ln_2/MLP on the side path. Blocks after the first
    # v-v block that are not v-v blocks leave x_vv unchanged. Taps read x_vv once it exists.
    x_vv = None
    taps = {}
    for l, block in enumerate(self.blocks, start=1):
      use_vv = l in vv_layers
      if use_vv and x_vv is None:
        x_vv = x
      x, vv = block(x, value_value=use_vv)
      if use_vv:
        x_vv = x_vv + vv
      if l in layers:
        taps[l] = x if x_vv is None else x_vv
    hidden = tuple(taps[l] for l in layers)
    projected = tuple(self.project(t) for t in hidden) if project_tokens else None
    return VisionOutput(hidden_states=hidden, image_embeds=self.project(x[:, 0]), projected=projected)


class TextTower(nnx.Module):

  def __init__(self, c: TextConfig, projection_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.config = c
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.token_embedding = nnx.Embed(c.vocab_size, c.width, embedding_init=nnx.initializers.normal(0.02), **kw)
    self.pos_embed = _normal(rngs, (c.context_length, c.width), 0.01, param_dtype)
    self.blocks = _blocks(c, dtype, param_dtype, rngs)
    self.ln_final = nnx.LayerNorm(c.width, epsilon=c.layer_norm_eps, **kw)
    self.proj = _normal(rngs, (c.width, projection_dim), c.width ** -0.5, param_dtype)  # [D, E]

  def __call__(self, token_embeds: jax.Array, eot_index: jax.Array) -> jax.Array:
    """token_embeds [B, L, D] (no positions yet), eot_index [B] -> projected EOT feature [B, E]."""
    b, length, _ = token_embeds.shape
    if length > self.config.context_length:
      raise ValueError(f"{length} tokens exceed the context length {self.config.context_length}")
    x = token_embeds.astype(self.dtype) + self.pos_embed[:length].astype(self.dtype)
    for block in self.blocks:
      x, _ = block(x, causal=True)
    eot = x[jnp.arange(b), eot_index]  # [B, D]; LayerNorm is per token, so pool first
    return self.ln_final(eot) @ self.proj[...].astype(self.dtype)


LOCAL_TOKENS = ("raw", "value_value")


class CLIP(nnx.Module):
  """OpenAI CLIP: `encode_image`, `encode_text`, `encode_text_embeds`; SSVP's semantic backbone
  (`encode`, ssvp_jax/models/backbone.py).

  local_tokens (D3): what `encode` returns as patch tokens: "raw" the residual stream of each tap
  (SSVP maps it into the joint space with a learned layer), "value_value" AnomalyCLIP's v-v path
  from the first tap on, through ln_post @ proj (already in the joint space).
  """

  MEAN, STD = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

  def __init__(self, config: CLIPConfig, *, local_tokens: str = "raw", dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if local_tokens not in LOCAL_TOKENS:
      raise ValueError(f"local_tokens must be one of {LOCAL_TOKENS}, got {local_tokens!r}")
    self.config = config
    self.local_tokens = local_tokens
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.vision = VisionTower(config.vision, config.projection_dim, **kw)
    self.text = TextTower(config.text, config.projection_dim, **kw)

  def encode_image(self, images: jax.Array, layers: Sequence[int] = (), value_value_layers: Sequence[int] = (),
                   project_tokens: bool = False) -> VisionOutput:
    """images [B, H, W, 3] float, normalised with CLIP's mean/std; H, W multiples of the patch.

    layers: 1-based blocks whose residual stream to return (block l's output equals
      transformers' `hidden_states[l]`); value_value_layers: blocks that run
      AnomalyCLIP's v-v side path (taps at or after its start return it instead);
      project_tokens: also return each tap through ln_post @ proj.
    """
    return self.vision(images, layers, value_value_layers, project_tokens)

  # -------------------------------------------------------------- the backbone interface

  @property
  def patch_size(self) -> int:
    return self.config.vision.patch_size

  @property
  def local_in_joint_space(self) -> bool:
    return self.local_tokens == "value_value"

  @property
  def local_dim(self) -> int:
    return self.config.projection_dim if self.local_in_joint_space else self.config.vision.width

  @property
  def global_dim(self) -> int:
    return self.config.projection_dim

  @property
  def text_width(self) -> int:
    return self.config.text.width

  @property
  def context_length(self) -> int:
    return self.config.text.context_length

  def encode(self, images: jax.Array, layers: Sequence[int]) -> Encoded:
    """Patch tokens of the taps (`local_tokens`) and the image embedding ln_post(CLS) @ proj."""
    layers = tuple(layers)
    vv = tuple(range(min(layers), max(layers) + 1)) if self.local_in_joint_space else ()
    out = self.encode_image(images, layers, value_value_layers=vv, project_tokens=bool(vv))
    taps = out.projected if vv else out.hidden_states
    return Encoded(local=tuple(t[:, 1:] for t in taps), global_=out.image_embeds)

  @property
  def token_embedding(self) -> nnx.Embed:
    """The text tower's token table ([vocab, width]); call it on ids to embed fixed words."""
    return self.text.token_embedding

  def encode_text_embeds(self, token_embeds: jax.Array, eot_index: jax.Array) -> jax.Array:
    """token_embeds [B, L, D] before positions are added, eot_index [B] -> [B, E]."""
    return self.text(token_embeds, eot_index)

  def encode_text(self, input_ids: jax.Array) -> jax.Array:
    """input_ids [B, L] int -> [B, E]; pools at argmax(ids), the EOT token, as OpenAI does."""
    input_ids = jnp.asarray(input_ids)
    return self.text(self.text.token_embedding(input_ids), jnp.argmax(input_ids, axis=-1))


# ----------------------------------------------------------------------------- loading


def _read_config(bundle_dir: str) -> CLIPConfig:
  path = os.path.join(bundle_dir, bundle.CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing: {bundle_dir} is not a converted clip bundle "
                            "(write one with convert/clip.py)")
  with open(path) as f:
    return CLIPConfig.from_dict(json.load(f)["config"])


def load(bundle_dir: str, *, pos_interpolation: str | None = None, local_tokens: str = "raw", dtype=jnp.float32,
         param_dtype=jnp.float32) -> CLIP:
  """Builds CLIP from a bundle written by convert/clip.py; every key and shape checked.

  pos_interpolation overrides the bundle's ("bilinear" or "bicubic").
  """
  cfg_dict, flat = bundle.read_bundle(bundle_dir, "clip")
  cfg = CLIPConfig.from_dict(cfg_dict)
  if pos_interpolation is not None:
    cfg = cfg.replace(pos_interpolation=pos_interpolation)
  model = empty(cfg, local_tokens=local_tokens, dtype=dtype, param_dtype=param_dtype)
  bundle.assign_params(model, flat, source=os.path.join(bundle_dir, bundle.WEIGHTS_FILE))
  return model


def empty(config: CLIPConfig, *, local_tokens: str = "raw", dtype=jnp.float32, param_dtype=jnp.float32) -> CLIP:
  """A CLIP whose parameters are zeros, built without running the random initialisers
  (slow to compile, and pointless for ViT-L's 428M weights about to be overwritten)."""
  return bundle.zeros_module(lambda: CLIP(config, local_tokens=local_tokens, dtype=dtype, param_dtype=param_dtype,
                                          rngs=nnx.Rngs(0)))


def build(section, *, dtype, rngs: nnx.Rngs) -> CLIP:
  """The registry's entry (ssvp_jax/models/registry.py): from `section.bundle`, or the preset
  `section.random_init`; `section.pos_interpolation` and `section.local_tokens` apply to both."""
  if section.bundle:
    return load(section.bundle, pos_interpolation=section.pos_interpolation, local_tokens=section.local_tokens,
                dtype=dtype)
  cfg = PRESETS[section.random_init]().replace(pos_interpolation=section.pos_interpolation)
  return CLIP(cfg, local_tokens=section.local_tokens, dtype=dtype, rngs=rngs)


def tokenizer(section):
  """The bundle's BPE tokenizer, or the byte-level one of the random presets."""
  return load_tokenizer(section.bundle) if section.bundle else byte_level_tokenizer()


def load_tokenizer(bundle_dir: str):
  """transformers' CLIPTokenizer from DIR/tokenizer/, checked against the text vocabulary.

  Offline, a tokenizer folder transformers cannot read comes back as a placeholder
  of length 2 without an error (TRAPS.md); the length check turns that into one.
  """
  from transformers import CLIPTokenizer  # seconds to import: only where a tokenizer is built

  cfg = _read_config(bundle_dir)
  tok_dir = os.path.join(bundle_dir, "tokenizer")
  if not os.path.isdir(tok_dir):
    raise FileNotFoundError(f"{tok_dir} is missing: re-run convert/clip.py (with --tokenizer if needed)")
  tok = CLIPTokenizer.from_pretrained(tok_dir)
  check_tokenizer(tok, cfg.text.vocab_size, tok_dir)
  return tok


def check_tokenizer(tok, vocab_size: int, source: str) -> None:
  """Raises ValueError unless `tok` has `vocab_size` entries and EOT is the largest id."""
  if len(tok) != vocab_size:
    raise ValueError(f"{source}: tokenizer has {len(tok)} tokens but the text tower's vocabulary has "
                     f"{vocab_size}; it is not this model's tokenizer (a length of 2 is transformers' "
                     "offline placeholder for files it could not read)")
  if tok.eos_token_id != vocab_size - 1:
    raise ValueError(f"{source}: end-of-text id is {tok.eos_token_id}, expected {vocab_size - 1} "
                     "(CLIP pools the text feature at the largest token id)")


def bytes_to_unicode() -> dict[int, str]:
  """OpenAI's (GPT-2's) reversible byte -> printable character table, in vocabulary order."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  rest = [b for b in range(256) if b not in printable]
  return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


def clip_tokenizer(merges: Sequence[tuple[str, str]]):
  """transformers' CLIPTokenizer with OpenAI's vocabulary layout for the given BPE merges.

  ids: 256 byte characters, the same with `</w>`, one per merge, `<|startoftext|>`,
  `<|endoftext|>` (so EOT is the largest id), as OpenAI's SimpleTokenizer builds it.
  Built from in-memory vocab/merges, the form that works offline (TRAPS.md).
  """
  from transformers import CLIPTokenizer  # seconds to import: only where a tokenizer is built

  merges = [tuple(m) for m in merges]
  chars = list(bytes_to_unicode().values())
  tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError("BPE merges produce duplicate vocabulary entries")
  return CLIPTokenizer(vocab=vocab, merges=merges)



def byte_level_tokenizer():
  """A CLIP tokenizer without merges (BYTE_VOCAB_SIZE ids): for randomly initialised demo
  and test models, which cannot download OpenAI's BPE file."""
  return clip_tokenizer([])


def tokenize(tokenizer, texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
  """int32 ids [B, context_length]: SOT, tokens, EOT, then zeros, as OpenAI's clip.tokenize.

  Text longer than the context is cut and its last token replaced by EOT.
  """
  texts = [texts] if isinstance(texts, str) else list(texts)
  out = np.zeros((len(texts), context_length), dtype=np.int32)
  for i, ids in enumerate(tokenizer(texts)["input_ids"]):
    if len(ids) > context_length:
      ids = ids[:context_length - 1] + [tokenizer.eos_token_id]
    out[i, :len(ids)] = ids
  return out
