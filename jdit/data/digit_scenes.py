"""Digit scenes: the bundled text-to-image dataset, made deterministically from scikit-learn's 8x8 digits.

An element is an RGB canvas of 8 x 16 pixels (H x W) with a digit in the left 8x8 cell and one in the right,
each in one of seven colors (two different colors per canvas; pixel = intensity / 16 x color, black
background), captioned "<color> <digit word> and <color> <digit word>", left then right, e.g.
"red three and blue seven". Pairs (left a, right b) with (a + 2 b) % 10 == 0 are held out of training, so
sampling them shows composition the model never saw.

    source = DigitScenesSource("train")          # or "held_out"
    source[0] -> {"image": uint8 (8, 16, 3), "caption": str, "label": 0, "digits": (a, b), "colors": (c, d)}
"""
import functools

import numpy as np

from jdit.data import checks

COLORS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "cyan": (0, 1, 1),
          "magenta": (1, 0, 1), "white": (1, 1, 1)}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "held_out")
# The word-level vocabulary of the captions; [EOS] is the last (largest) id, so both CLIP pooling conventions
# (argmax of the ids, or the first end-of-text id) find it.
VOCABULARY = ("[PAD]", "[BOS]", *COLORS, *DIGIT_WORDS, "and", "[EOS]")
TOKENS = 8  # [BOS] + 5 words + [EOS], padded
SCENES_PER_SPLIT = {"train": 20_000, "held_out": 2_000}


def held_out(left: int, right: int) -> bool:
  return (left + 2 * right) % 10 == 0


def pairs(split: str) -> list[tuple[int, int]]:
  """The (left, right) digit pairs of a split: 90 for training, the 10 held-out pairs otherwise."""
  if split not in SPLITS:
    raise ValueError(f"data.split must be one of {SPLITS} for digit_scenes, got {split!r}")
  return [(a, b) for a in range(10) for b in range(10) if held_out(a, b) == (split == "held_out")]


def caption(left: int, right: int, left_color: str, right_color: str) -> str:
  return f"{left_color} {DIGIT_WORDS[left]} and {right_color} {DIGIT_WORDS[right]}"


def parse_caption(text: str) -> tuple[int, int, str, str]:
  """(left digit, right digit, left color, right color) of a digit-scenes caption; ValueError otherwise."""
  words = text.split()
  if len(words) != 5 or words[2] != "and" or words[0] not in COLORS or words[3] not in COLORS \
      or words[1] not in DIGIT_WORDS or words[4] not in DIGIT_WORDS:
    raise ValueError(f"not a digit-scenes caption: {text!r} (expected '<color> <digit> and <color> <digit>')")
  return DIGIT_WORDS.index(words[1]), DIGIT_WORDS.index(words[4]), words[0], words[3]


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits
  digits = load_digits()
  return digits.images.astype(np.float32), digits.target


def render(left_image: np.ndarray, right_image: np.ndarray, left_color: str, right_color: str) -> np.ndarray:
  """Two 8x8 intensity images (0..16) -> the (8, 16, 3) uint8 canvas."""
  cells = [image[..., None] / 16.0 * np.asarray(COLORS[color], np.float32)
           for image, color in ((left_image, left_color), (right_image, right_color))]
  return np.round(np.concatenate(cells, axis=1) * 255).astype(np.uint8)


class DigitScenesSource:
  """Deterministic scenes of one split: element i draws its pair, digit images and colors from (seed, i)."""

  def __init__(self, split: str = "train", seed: int = 0, size: int | None = None):
    self.pairs, self.seed = pairs(split), seed
    self.size = SCENES_PER_SPLIT[split] if size is None else size
    images, targets = _digits()
    self.images, self.by_digit = images, [np.flatnonzero(targets == d) for d in range(10)]

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict:
    rng = np.random.default_rng([self.seed, index])
    left, right = self.pairs[rng.integers(len(self.pairs))]
    left_color, right_color = rng.choice(list(COLORS), size=2, replace=False)
    image = render(self.images[rng.choice(self.by_digit[left])], self.images[rng.choice(self.by_digit[right])],
                   left_color, right_color)
    return {"image": image, "caption": caption(left, right, left_color, right_color), "label": 0,
            "digits": (int(left), int(right)), "colors": (str(left_color), str(right_color))}


def default_prompts() -> tuple[str, ...]:
  """One prompt per held-out pair, colors cycling: what the demo samples."""
  names = list(COLORS)
  return tuple(caption(a, b, names[i % 7], names[(i + 3) % 7]) for i, (a, b) in enumerate(pairs("held_out")))


@functools.lru_cache(maxsize=1)
def tokenizer():
  """The captions' word-level tokenizer (the `tokenizers` library): [BOS] words [EOS], padded with [PAD] to
  TOKENS ids; an unknown word is an error."""
  from tokenizers import Tokenizer, pre_tokenizers, processors
  from tokenizers.models import WordLevel
  backend = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCABULARY)}, unk_token="[PAD]"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  backend.post_processor = processors.TemplateProcessing(
      single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 1), ("[EOS]", len(VOCABULARY) - 1)])
  backend.enable_padding(length=TOKENS, pad_id=0, pad_token="[PAD]")
  backend.enable_truncation(TOKENS)
  return backend


def tokenize(captions: list[str]) -> np.ndarray:
  """Captions -> (N, TOKENS) int32 ids; the empty caption is [BOS] [EOS] (the unconditional input)."""
  unknown = sorted({w for c in captions for w in c.split() if w not in VOCABULARY})
  if unknown:
    raise ValueError(f"words outside the digit-scenes vocabulary: {', '.join(unknown)} (colors "
                     f"{', '.join(COLORS)}; digits zero..nine; 'and')")
  return np.asarray([e.ids for e in tokenizer().encode_batch(list(captions))], np.int32)


class SceneTransform:
  """Scene record -> {"image": uint8 (8, 16, 3), "tokens": int32 (TOKENS,)}, the caption replaced by the empty
  one with probability caption_dropout_prob (what guidance learns from)."""

  def __init__(self, caption_dropout_prob: float):
    self.dropout = caption_dropout_prob

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    text = "" if rng.random() < self.dropout else record["caption"]
    return {"image": record["image"], "tokens": tokenize([text])[0]}


def token_conditions(prompts: list[str]) -> dict:
  """Sampling conditions of a token model: {"tokens", "null_tokens"} (the empty caption), one row per prompt."""
  tokens = tokenize(list(prompts))
  return {"tokens": tokens, "null_tokens": np.repeat(tokenize([""]), len(tokens), 0)}


# ----------------------------------------------------------------------------------------------
#                               Data source interface (jdit.data.sources)
# ----------------------------------------------------------------------------------------------

PROVIDES = ("image", "tokens")
SHAPE = (8, 16, 3)  # (H, W, C) of a scene


def open_source(data) -> DigitScenesSource:
  return DigitScenesSource(data.split, data.seed)


def transform(data, source, shape=None) -> SceneTransform:
  del source, shape
  return SceneTransform(data.caption_dropout_prob)


def check(data, model, source) -> None:
  """The model reads token ids of this vocabulary with its own text encoder, and 8x16 RGB canvases."""
  del source
  checks.no_buckets(data, "digit_scenes")
  want = dict(text_vocab_size=len(VOCABULARY), text_length=TOKENS, text_eos_id=len(VOCABULARY) - 1)
  if any(getattr(model, k, None) != v for k, v in want.items()):
    raise ValueError(f"a model with its own text encoder trains on data.source='digit_scenes' with "
                     f"{', '.join(f'model.{k}={v}' for k, v in want.items())}")
  if (*model.input_hw, model.in_channels) != SHAPE:
    raise ValueError(f"model.input_size={model.input_hw}, model.in_channels={model.in_channels} must be (8, 16) "
                     "and 3 for data.source='digit_scenes' (8x16 RGB canvases)")


def prompt_conditions(data, model, prompts: list[str]) -> dict:
  del data, model
  return token_conditions(prompts)


def grid_conditions(data, sample, source) -> tuple[dict, list[str]]:
  """Training grids: the first 10 of sample.prompts (a tuple), else of the held-out prompts."""
  del data, source
  prompts = sample.prompts if not isinstance(sample.prompts, str) and sample.prompts else default_prompts()
  captions = list(prompts)[:10]
  return token_conditions(captions), captions
