"""Frozen text encoders for text-to-image models: CLIP (OpenAI, OpenCLIP) and T5 encoders in Flax, their
tokenizers, and loaders for the weights people have on disk.

    encoder, params = load_text_encoder("sd3/text_encoder_2")            # or a single .safetensors file
    tokenizer = load_tokenizer("sd3/tokenizer_2")
    ids = tokenizer(["a photo of a cat"], max_length=77)               # (N, 77) int32
    out = encoder.apply({"params": params}, ids)  # last_hidden_state, penultimate_hidden_state[, pooled]
"""
from jdit.text.clip import CLIP_PRESETS, CLIPTextEncoder
from jdit.text.t5 import T5_PRESETS, T5Encoder
from jdit.text.tokenizer import Tokenizer, load_tokenizer
from jdit.text.weights import create_text_encoder, encoder_from_weights, load_text_encoder

__all__ = ["CLIP_PRESETS", "CLIPTextEncoder", "T5_PRESETS", "T5Encoder", "Tokenizer", "load_tokenizer",
           "create_text_encoder", "encoder_from_weights", "load_text_encoder"]
