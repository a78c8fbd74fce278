"""A tiny offline CLIP tokenizer and a randomly initialised transformers CLIPModel of odd sizes, plus the
matching JAX model (test_clip and test_convert_clip)."""

from __future__ import annotations

import collections
import gzip

import numpy as np
import torch
from flax import nnx

from convert import clip as convert_clip
from ssvp_jax.models import clip

CORPUS = ("a photo of a damaged metal nut . a cropped photo of the flawless bottle ; "
          "a close-up photo of a broken screw , a bright photo of the perfect capsule with a scratch "
          "a photo of an anomalous pill ; a photo of a normal hazelnut , a good transistor") * 3
N_MERGES = 40
SENTENCES = ["a photo of a damaged metal nut.", "A FLAWLESS bottle!", "screw", "",
             "a photo of a capsule with a crack, a scratch and a hole in the normal printed circuit board"]


def train_bpe(text: str, n_merges: int) -> list[tuple[str, str]]:
  """A toy byte-level BPE trainer in OpenAI's format (`</w>` marks a word's last symbol)."""
  b2u = clip.bytes_to_unicode()
  words = []
  for w in text.lower().split():
    sym = [b2u[b] for b in w.encode("utf-8")]
    words.append(tuple(sym[:-1] + [sym[-1] + "</w>"]))
  merges = []
  for _ in range(n_merges):
    pairs = collections.Counter(p for w in words for p in zip(w, w[1:]))
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    new_words = []
    for w in words:
      out, i = [], 0
      while i < len(w):
        if i + 1 < len(w) and (w[i], w[i + 1]) == best:
          out.append(w[i] + w[i + 1])
          i += 2
        else:
          out.append(w[i])
          i += 1
      new_words.append(tuple(out))
    words = new_words
  return merges


MERGES = train_bpe(CORPUS, N_MERGES)
VOCAB_SIZE = 512 + len(MERGES) + 2


def write_openai_bpe(path, merges=MERGES) -> str:
  """OpenAI's bpe_simple_vocab format: a header line, then one merge per line; gzipped."""
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("#version: 0.2 (toy)\n" + "\n".join(" ".join(m) for m in merges) + "\n")
  return str(path)


def make_tokenizer(merges=MERGES):
  """The reference tokenizer, built directly as TRAPS.md says works offline."""
  from transformers import CLIPTokenizer

  chars = [chr(c) for c in range(ord("!"), ord("~") + 1)] + [chr(c) for c in range(ord("¡"), ord("¬") + 1)]
  chars += [chr(c) for c in range(ord("®"), ord("ÿ") + 1)]
  printable = {ord(c) for c in chars}
  chars += [chr(256 + i) for i, _ in enumerate(b for b in range(256) if b not in printable)]
  tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
  tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=list(merges))
  assert len(tok) == len(tokens) == 512 + len(merges) + 2
  return tok


def hf_config(vocab_size: int = VOCAB_SIZE, **vision):
  from transformers import CLIPConfig

  v = dict(hidden_size=60, intermediate_size=132, num_hidden_layers=4, num_attention_heads=3,
           image_size=28, patch_size=7, hidden_act="quick_gelu", layer_norm_eps=1e-5)
  v.update(vision)
  cfg = CLIPConfig(
      text_config=dict(vocab_size=vocab_size, hidden_size=36, intermediate_size=76, num_hidden_layers=3,
                       num_attention_heads=3, max_position_embeddings=16, hidden_act="quick_gelu",
                       layer_norm_eps=1e-5, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                       pad_token_id=vocab_size - 1),
      vision_config=v, projection_dim=20)
  cfg._attn_implementation = "eager"
  return cfg


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Replaces transformers' init (LayerNorm = 1/0, tiny q/k) by weights that exercise every map."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "norm" in name or "layrnorm" in name:
        p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
      elif name.endswith("bias"):
        p.copy_(0.1 * noise)
      elif name == "logit_scale":
        continue
      elif p.ndim >= 2 and "embedding" not in name:  # linear [out, in] or conv [out, in, k, k]
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
      else:  # class / position / token embeddings
        p.copy_(0.5 * noise)
  return model.eval()


def hf_model(seed: int = 0, **vision):
  from transformers import CLIPModel

  torch.manual_seed(seed)
  return randomize_(CLIPModel(hf_config(**vision)), seed)


def hf_state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def jax_model(hf, pos_interpolation: str = "bilinear") -> clip.CLIP:
  """The JAX CLIP holding `hf`'s weights (converted in process)."""
  from ssvp_jax.models import bundle

  config = convert_clip.config_from_hf(hf.config.vision_config, hf.config.text_config,
                                       hf.config.projection_dim, pos_interpolation)
  model = clip.empty(config)
  bundle.assign_params(model, convert_clip.hf_to_flax(hf_state(hf), config))
  return model


# Jitted entry points: one compile per shape beats compiling every eager op on these CPUs.
encode_image = nnx.jit(clip.CLIP.encode_image, static_argnames=("layers", "value_value_layers", "project_tokens"))
encode_text = nnx.jit(clip.CLIP.encode_text)
encode_text_embeds = nnx.jit(clip.CLIP.encode_text_embeds)


def images(b: int, h: int, w: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(b, h, w, 3)).astype(np.float32)


def to_torch_images(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
