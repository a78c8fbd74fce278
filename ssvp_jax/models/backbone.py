"""The interface every frozen backbone implements (SPEC section 1), and nothing else.

SSVP reads two backbones by role, never by name:

    semantic     image + text towers in one joint space (CLIP): its global feature and the
                 text embeddings of the prompts are compared in that space.
    structural   an image tower (DINOv3, DINOv2): patch tokens rich in local structure.

A backbone is an `nnx.Module` with

    encode(images [B, H, W, 3], layers) -> Encoded     patch tokens of the 1-based blocks `layers`
                                                       and one global feature per image
    patch_size, local_dim, global_dim                  ints
    MEAN, STD                                          the per-channel input normalisation

and a semantic one also has the text side the prompt learner drives (`TextSide`). The registry
(`ssvp_jax/models/registry.py`) turns `config.backbones.<role>.name` into a built module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol, Sequence

if TYPE_CHECKING:  # no JAX at import: the data pipeline's grain workers import the role names
  import jax

ROLES = ("semantic", "structural")

# OpenAI CLIP's normalisation (clip/clip.py `_transform`) and torchvision's ImageNet one (DINOv2/v3).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Encoded(NamedTuple):
  """One backbone's features of a batch."""
  local: tuple[jax.Array, ...]  # L x [B, N, local_dim]: patch tokens only (no CLS, no registers)
  global_: jax.Array            # [B, global_dim]


class Backbone(Protocol):
  MEAN: tuple[float, float, float]
  STD: tuple[float, float, float]

  @property
  def patch_size(self) -> int: ...

  @property
  def local_dim(self) -> int: ...

  @property
  def global_dim(self) -> int: ...

  def encode(self, images: jax.Array, layers: Sequence[int]) -> Encoded: ...


class TextSide(Protocol):
  """What a semantic backbone adds: the prompt learner's view of its text tower (Eq. 6)."""

  @property
  def text_width(self) -> int: ...          # token embedding width (learnable prompt vectors)

  @property
  def context_length(self) -> int: ...

  @property
  def local_in_joint_space(self) -> bool: ...  # local tokens already projected (no learned map)

  def token_embedding(self, ids: jax.Array) -> jax.Array: ...

  def encode_text_embeds(self, token_embeds: jax.Array, eot_index: jax.Array) -> jax.Array: ...
