"""CLIP and T5 tokenizers from Hugging Face tokenizer directories, built on the `tokenizers` library (no torch),
giving the ids transformers' CLIPTokenizer / T5Tokenizer give with padding="max_length", truncation=True.

    tok = load_tokenizer("sd3/tokenizer_2")        # CLIP: vocab.json + merges.txt (or tokenizer.json)
    ids = tok(["a photo of a cat", ""], max_length=77)                   # (2, 77) int32
    ids, mask = tok(prompts, max_length=256, return_attention_mask=True)  # T5: spiece.model or tokenizer.json
The pad token is the directory's (tokenizer_config.json / special_tokens_map.json): SD3's CLIP-G pads with "!"
(id 0), CLIP-L with <|endoftext|>, T5 with <pad>.
"""
import base64
import json
import os

import numpy as np
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE, Unigram

CLIP_SPECIALS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                 "pad_token": "<|endoftext|>"}
T5_SPECIALS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class Tokenizer:
  """Text -> fixed-length int32 ids (and attention mask): truncated to max_length with the end token kept,
  padded with the pad token."""

  def __init__(self, backend: Backend, pad_token: str, kind: str):
    self.backend, self.pad_token, self.kind = backend, pad_token, kind
    self.pad_id = backend.token_to_id(pad_token)

  def __call__(self, texts: list[str] | str, max_length: int = 77,
               return_attention_mask: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not all(isinstance(t, str) for t in texts):
      raise TypeError("texts must be a string or a list of strings")
    if max_length < 2:
      raise ValueError(f"max_length must be at least 2 (room for the special tokens), got {max_length}")
    self.backend.enable_truncation(max_length)
    self.backend.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=self.pad_token)
    encodings = self.backend.encode_batch(texts)
    ids = np.asarray([e.ids for e in encodings], np.int32).reshape(len(texts), max_length)
    if not return_attention_mask:
      return ids
    return ids, np.asarray([e.attention_mask for e in encodings], np.int32).reshape(len(texts), max_length)


def _token_text(value) -> str | None:
  return value.get("content") if isinstance(value, dict) else value


def special_tokens(directory: str, defaults: dict) -> dict:
  """The directory's special tokens: defaults, then tokenizer_config.json, then special_tokens_map.json."""
  tokens = dict(defaults)
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        config = json.load(f)
      tokens.update({k: _token_text(config[k]) for k in defaults if config.get(k) is not None})
      if "extra_ids" in config:
        tokens["extra_ids"] = config["extra_ids"]
  return tokens


def clip_tokenizer(vocab: dict, merges: list, specials: dict) -> Tokenizer:
  """transformers' CLIPTokenizer pipeline: NFC, whitespace runs -> " ", lowercase; CLIP's split regex, byte-level
  BPE with </w> word ends; <|startoftext|> ... <|endoftext|>."""
  backend = Backend(BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False, unk_token=specials["unk_token"]))
  backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                             normalizers.Lowercase()])
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  backend.decoder = decoders.ByteLevel()
  _add_specials(backend, [specials[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")])
  eos, bos = specials["eos_token"], specials["bos_token"]
  backend.post_processor = processors.RobertaProcessing((eos, backend.token_to_id(eos)),
                                                        (bos, backend.token_to_id(bos)), False, False)
  return Tokenizer(backend, specials["pad_token"], "clip")


def t5_tokenizer(pieces: list[tuple[str, float]], charsmap: bytes | None, specials: dict) -> Tokenizer:
  """transformers' T5Tokenizer pipeline: the SentencePiece normalization table, whitespace split and metaspace,
  unigram model; ids end with </s>. `pieces` include the <extra_id_*> sentinels."""
  backend = Backend(Unigram(pieces, unk_id=2, byte_fallback=False))
  if charsmap:
    backend.normalizer = normalizers.Precompiled(charsmap)
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always",
                                                                 split=True)])
  backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
  sentinels = [p for p, _ in pieces if p.startswith("<extra_id_")]
  _add_specials(backend, [specials[k] for k in ("eos_token", "unk_token", "pad_token")] + sentinels)
  eos = specials["eos_token"]
  backend.post_processor = processors.TemplateProcessing(single=["$A", eos], pair=["$A", eos, "$B", eos],
                                                         special_tokens=[(eos, backend.token_to_id(eos))])
  return Tokenizer(backend, specials["pad_token"], "t5")


def _add_specials(backend: Backend, tokens: list[str]) -> None:
  unique = list(dict.fromkeys(tokens))
  missing = [t for t in unique if backend.token_to_id(t) is None]
  if missing:
    raise ValueError(f"special token(s) {', '.join(map(repr, missing))} are not in the vocabulary")
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in unique])


def _with_sentinels(pieces: list, extra_ids: int) -> list:
  known = {p for p, _ in pieces}
  return pieces + [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1) if f"<extra_id_{i}>" not in known]


def load_tokenizer(path: str) -> Tokenizer:
  """The CLIP or T5 tokenizer of a Hugging Face tokenizer directory (a diffusers pipeline's tokenizer* folder):
  CLIP from vocab.json + merges.txt or tokenizer.json (BPE); T5 from tokenizer.json (Unigram) or spiece.model."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: not a tokenizer directory")
  files = set(os.listdir(path))
  if "tokenizer.json" in files:
    with open(os.path.join(path, "tokenizer.json"), encoding="utf-8") as f:
      spec = json.load(f)
    model = spec.get("model", {})
    if model.get("type") == "BPE":
      merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
      return clip_tokenizer(model["vocab"], merges, special_tokens(path, CLIP_SPECIALS))
    if model.get("type") == "Unigram":
      specials = special_tokens(path, T5_SPECIALS)
      pieces = _with_sentinels([tuple(p) for p in model["vocab"]], specials.get("extra_ids", 100))
      return t5_tokenizer(pieces, _precompiled_charsmap(spec.get("normalizer")), specials)
    raise ValueError(f"{path}/tokenizer.json: model type {model.get('type')!r}; expected BPE (CLIP) or Unigram (T5)")
  if {"vocab.json", "merges.txt"} <= files:
    vocab, merges = BPE.read_file(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))
    return clip_tokenizer(vocab, merges, special_tokens(path, CLIP_SPECIALS))
  if "spiece.model" in files:
    from jdit.text import sentencepiece_model
    specials = special_tokens(path, T5_SPECIALS)
    proto = sentencepiece_model.read(os.path.join(path, "spiece.model"))
    pieces = _with_sentinels(proto["pieces"], specials.get("extra_ids", 100))
    return t5_tokenizer(pieces, proto["precompiled_charsmap"], specials)
  present = [f for f in ("vocab.json", "merges.txt") if f in files]
  raise FileNotFoundError(
      f"{path}: no tokenizer found: needs tokenizer.json, vocab.json + merges.txt (CLIP) or spiece.model (T5)"
      + (f"; has {present[0]} but lacks {({'vocab.json', 'merges.txt'} - set(present)).pop()}" if present else ""))


def _precompiled_charsmap(normalizer: dict | None) -> bytes | None:
  """The SentencePiece normalization table inside a tokenizer.json normalizer (alone or in a Sequence)."""
  if not normalizer:
    return None
  for item in normalizer.get("normalizers", [normalizer]):
    if item.get("type") == "Precompiled" and item.get("precompiled_charsmap"):
      return base64.b64decode(item["precompiled_charsmap"])
  return None
