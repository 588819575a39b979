"""Test fixtures for the text encoders: reference transformers models with perturbed weights, the real CLIP BPE
vocabulary (shipped in the open_clip_torch wheel, read without importing open_clip) and a trained SentencePiece
T5 vocabulary, written as Hugging Face directories."""
import gzip
import importlib.util
import json
import os

import numpy as np

# Awkward prompts: empty, very long, unicode, punctuation, repeated whitespace, emoji, special-token text.
PROMPTS = ["", "a photo of a cat", "A   photo\t\tof\n\na DOG!!!", "Café naïve résumé – “quotes” ½ ﬁ", "一只猫坐在垫子上",
           "🐱🚀 emoji ✨👩‍👩‍👧", "it's they're I'll we've 1234 3.14", "<|endoftext|> inside <|startoftext|>",
           "hello!world! ! !!", "  leading and trailing  ", " ".join(f"word{i}" for i in range(200)), "x" * 500,
           "«»‹›„‚ ‘’ ; : ? ¿ ¡", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ ①"]
CORPUS = ["the quick brown fox jumps over the lazy dog", "a photo of a cat sitting on a mat", "Café naïve résumé",
          "一只猫坐在垫子上", "hello world 1234 3.14!", "an astronaut riding a horse on the moon"]


def perturbed(model, scale: float = 0.05, seed: int = 0):
  """The model with N(0, scale^2) noise added to every parameter (norm scales and biases included), in eval mode."""
  import torch
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=generator) * scale)
  return model.eval()


def _bytes_to_unicode() -> list[str]:
  """GPT-2's byte -> printable character table, in byte order of the CLIP vocabulary."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
      + list(range(ord("®"), ord("ÿ") + 1))
  chars, extra = printable[:], 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + extra)
      extra += 1
  return [chr(c) for c in chars]


def write_clip_vocab(directory: str, special_tokens: dict | None = None, config: dict | None = None) -> int:
  """vocab.json + merges.txt of OpenAI CLIP (49,408 tokens) from open_clip's BPE file; returns the vocab size."""
  spec = importlib.util.find_spec("open_clip")
  path = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")
  lines = gzip.open(path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
  merges = [tuple(line.split()) for line in lines]
  base = _bytes_to_unicode()
  vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump({token: i for i, token in enumerate(vocab)}, f)
  with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
  for name, contents in (("special_tokens_map.json", special_tokens), ("tokenizer_config.json", config)):
    if contents:
      with open(os.path.join(directory, name), "w") as f:
        json.dump(contents, f)
  return len(vocab)


def write_spiece(directory: str) -> str:
  """A unigram SentencePiece model trained on CORPUS with T5's ids (pad 0, eos 1, unk 2), as spiece.model."""
  import sentencepiece as spm
  os.makedirs(directory, exist_ok=True)
  corpus = os.path.join(directory, "corpus.txt")
  with open(corpus, "w", encoding="utf-8") as f:
    f.write("\n".join(CORPUS * 40))
  spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(directory, "spiece"), vocab_size=60,
                                 model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 hard_vocab_limit=False, character_coverage=1.0, minloglevel=2)
  os.remove(corpus)
  os.remove(os.path.join(directory, "spiece.vocab"))
  return os.path.join(directory, "spiece.model")


def clip_config(**overrides):
  import transformers
  fields = dict(vocab_size=49408, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=24, eos_token_id=49407,
                bos_token_id=49406, pad_token_id=49407)
  return transformers.CLIPTextConfig(**{**fields, **overrides})


def t5_config(**overrides):
  import transformers
  fields = dict(vocab_size=160, d_model=64, d_kv=16, d_ff=96, num_layers=3, num_heads=4,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=20)
  return transformers.T5Config(**{**fields, **overrides})


def clip_ids(batch: int, length: int, rng: np.random.Generator, vocab: int = 49406, bos: int = 49406,
             eos: int = 49407) -> np.ndarray:
  """Token ids as a CLIP tokenizer makes them: bos, words, eos, then padding with eos."""
  ids = rng.integers(0, vocab, (batch, length))
  ids[:, 0] = bos
  for row, end in enumerate(rng.integers(2, length, batch)):
    ids[row, end:] = eos
  return ids


def write_latent_vae(path: str, scaling_factor: float, shift_factor: float) -> None:
  """A tiny 16-channel diffusers VAE without quant convs (SD3's and Flux's kind; 2x downsampling)."""
  import diffusers
  diffusers.AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=16,
                          use_quant_conv=False, use_post_quant_conv=False, scaling_factor=scaling_factor,
                          shift_factor=shift_factor).save_pretrained(path)


def write_sd3_pipeline(path) -> str:
  """A diffusers Stable Diffusion 3 pipeline directory of tiny perturbed components: the MM-DiT (16x16 images),
  CLIP-L, CLIP-G (its tokenizer pads with "!"), T5 with a SentencePiece vocabulary, the 16-channel VAE with SD3's
  scaling and shift, and the scheduler (shift 3)."""
  import diffusers
  import transformers
  path = os.fspath(path)
  perturbed(diffusers.SD3Transformer2DModel(
      sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
      joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=32, out_channels=16,
      pos_embed_max_size=16), scale=0.2).save_pretrained(os.path.join(path, "transformer"))
  for i, (encoder, tokenizer, pad) in enumerate((("text_encoder", "tokenizer", None),
                                                 ("text_encoder_2", "tokenizer_2", "!"))):
    perturbed(transformers.CLIPTextModelWithProjection(clip_config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, projection_dim=16,
        hidden_act="quick_gelu" if i == 0 else "gelu")), seed=i).save_pretrained(os.path.join(path, encoder))
    write_clip_vocab(os.path.join(path, tokenizer),
                     config={"model_max_length": 77, **({"pad_token": pad} if pad else {})})
  perturbed(transformers.T5EncoderModel(t5_config(d_model=64, num_layers=1)), seed=3).save_pretrained(
      os.path.join(path, "text_encoder_3"))
  write_spiece(os.path.join(path, "tokenizer_3"))
  write_latent_vae(os.path.join(path, "vae"), scaling_factor=1.5305, shift_factor=0.0609)
  diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(os.path.join(path, "scheduler"))
  with open(os.path.join(path, "model_index.json"), "w") as f:
    json.dump({"_class_name": "StableDiffusion3Pipeline"}, f)
  return path


def write_flux_pipeline(path) -> str:
  """A diffusers Flux.1-dev pipeline directory of tiny perturbed components: the Flux transformer (guidance
  embedding; 16x16 images), CLIP-L without projection (its pooled output), T5 with a SentencePiece vocabulary,
  the 16-channel VAE with Flux's scaling and shift, and the dynamically shifting scheduler."""
  import diffusers
  import transformers
  path = os.fspath(path)
  perturbed(diffusers.FluxTransformer2DModel(
      patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
      joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
      scale=0.2).save_pretrained(os.path.join(path, "transformer"))
  perturbed(transformers.CLIPTextModel(clip_config(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                   num_attention_heads=2))).save_pretrained(
      os.path.join(path, "text_encoder"))
  write_clip_vocab(os.path.join(path, "tokenizer"), config={"model_max_length": 77})
  perturbed(transformers.T5EncoderModel(t5_config(d_model=64, num_layers=1)), seed=3).save_pretrained(
      os.path.join(path, "text_encoder_2"))
  write_spiece(os.path.join(path, "tokenizer_2"))
  write_latent_vae(os.path.join(path, "vae"), scaling_factor=0.3611, shift_factor=0.1159)
  diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).save_pretrained(
      os.path.join(path, "scheduler"))
  with open(os.path.join(path, "model_index.json"), "w") as f:
    json.dump({"_class_name": "FluxPipeline"}, f)
  return path
