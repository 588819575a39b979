"""jdit.eval.clip: the CLIP image tower against transformers' CLIPModel on random weights and real photos (hidden
states, pooled, image_embeds), the preprocessing against CLIPImageProcessorPil, and the CLIP score and directional
similarity against the same model's features."""
import os

import numpy as np
import pytest
import skimage.data
from conftest import load_tool, relative_error

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jdit.eval import clip  # noqa: E402
from jdit.text import load_text_encoder  # noqa: E402

pytestmark = pytest.mark.xdist_group("eval_clip")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.CLIPConfig(
      text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=77, vocab_size=49408),
      vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         image_size=32, patch_size=8), projection_dim=48)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # perturb the zero-initialised biases and unit norms so every tensor matters
    for parameter in model.parameters():
      parameter.add_(0.02 * torch.randn_like(parameter))
  path = str(tmp_path_factory.mktemp("clip") / "clip")
  model.save_pretrained(path)
  return path, model


def _photos(size=(48, 64)) -> np.ndarray:
  from PIL import Image
  return np.stack([np.asarray(Image.fromarray(getattr(skimage.data, name)()).resize(size, Image.BICUBIC))
                   for name in ("astronaut", "coffee", "chelsea", "rocket")])


def test_preprocessing_equals_clip_image_processor():
  images = _photos((50, 37))  # portrait and odd sizes: the shortest-edge rounding matters
  ours = clip.clip_preprocess(images, 32)
  processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  theirs = processor(list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_vision_tower_matches_transformers(clip_dir):
  path, model = clip_dir
  vision, params = clip.load_clip_vision(path)
  assert (vision.num_heads, vision.image_size, vision.projection_dim, vision.num_layers) == (2, 32, 48, 2)
  pixels = clip.clip_preprocess(_photos(), 32)
  ours = vision.apply({"params": params}, pixels)
  with torch.no_grad():
    out = model.vision_model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    embeds = model.visual_projection(out.pooler_output)
  assert relative_error(ours["last_hidden_state"], out.last_hidden_state.numpy()) < 1e-5
  assert relative_error(ours["pooled"], out.pooler_output.numpy()) < 1e-5
  assert relative_error(ours["image_embeds"], embeds.numpy()) < 1e-5


def test_clip_score_and_directional_similarity_use_the_models_features(clip_dir):
  path, model = clip_dir
  vision, vision_params = clip.load_clip_vision(path)
  text, text_params = load_text_encoder(path)
  images = _photos()
  ids = np.random.default_rng(0).integers(1, 49406, (4, 77))
  ids[:, 0], ids[:, 9:] = 49406, 49407  # start token, then the end-of-text token (padding repeats it)
  image_embeds = clip.image_embeddings(vision, vision_params, images)
  text_embeds = clip.text_embeddings(text, text_params, ids)
  with torch.no_grad():
    pixels = torch.from_numpy(clip.clip_preprocess(images, 32)).permute(0, 3, 1, 2)
    ti = model.get_image_features(pixel_values=pixels)
    tt = model.get_text_features(input_ids=torch.from_numpy(ids))
  ti = getattr(ti, "pooler_output", ti).numpy().astype(np.float64)
  tt = getattr(tt, "pooler_output", tt).numpy().astype(np.float64)
  ti, tt = ti / np.linalg.norm(ti, axis=1, keepdims=True), tt / np.linalg.norm(tt, axis=1, keepdims=True)
  expected = np.maximum(100 * (ti * tt).sum(1), 0).mean()
  assert clip.clip_score(image_embeds, text_embeds) == pytest.approx(expected, abs=1e-4)
  direction = lambda a, b: (b - a) / np.linalg.norm(b - a, axis=1, keepdims=True)
  expected = (direction(ti[:2], ti[2:]) * direction(tt[:2], tt[2:])).sum(1).mean()
  ours = clip.directional_similarity(image_embeds[:2], image_embeds[2:], text_embeds[:2], text_embeds[2:])
  assert ours == pytest.approx(expected, abs=1e-5)
  assert clip.clip_score(-image_embeds, image_embeds) == 0.0  # negative cosines count as 0


def test_evaluate_tool_scores_text_to_image_samples(clip_dir, tmp_path, capsys):
  import json
  from text_helpers import write_clip_vocab
  tool = load_tool("evaluate")
  path, model = clip_dir
  write_clip_vocab(path)
  prompts = np.array(["an astronaut in a white suit", "a cup of coffee", "a cat", "a red rocket on a pad"])
  samples = str(tmp_path / "samples.npz")
  np.savez(samples, images=_photos(), prompts=prompts)
  assert tool.main([f"--clip={path}", samples]) == 0
  with open(tmp_path / "samples.clip.json") as f:
    results = json.load(f)
  assert f"CLIP score: {results['clip_score']}" in capsys.readouterr().out
  tokenizer = transformers.CLIPTokenizer.from_pretrained(path)  # the reference end to end: tokenizer and model
  with torch.no_grad():
    ids = tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    tt = model.get_text_features(input_ids=ids.input_ids)
    pixels = torch.from_numpy(clip.clip_preprocess(_photos(), 32)).permute(0, 3, 1, 2)
    ti = model.get_image_features(pixel_values=pixels)
  ti = getattr(ti, "pooler_output", ti).numpy().astype(np.float64)
  tt = getattr(tt, "pooler_output", tt).numpy().astype(np.float64)
  cos = (ti * tt).sum(1) / np.linalg.norm(ti, axis=1) / np.linalg.norm(tt, axis=1)
  np.testing.assert_allclose(results["per_image"], np.maximum(100 * cos, 0), atol=1e-4)

  np.savez(tmp_path / "bad.npz", images=_photos())
  assert tool.main([f"--clip={path}", str(tmp_path / "bad.npz")]) == 2
  error = capsys.readouterr().err
  assert error.count("\n") == 1 and "no prompts array" in error
  assert not (tmp_path / "bad.clip.json").exists()


def open_clip_transformer():
  """open_clip.transformer without the package __init__ (its other models need torchvision, a stub suffices)."""
  import importlib
  import sys
  import types
  spec = importlib.util.find_spec("open_clip")
  if spec is None:
    pytest.skip("open_clip is not installed")
  if "open_clip" not in sys.modules:
    package = types.ModuleType("open_clip")
    package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec  # find_spec still answers
    sys.modules["open_clip"] = package
  stubs = [] if importlib.util.find_spec("torchvision") else ["torchvision", "torchvision.ops", "torchvision.ops.misc"]
  for name in stubs:
    sys.modules[name] = types.ModuleType(name)
  if stubs:
    sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
  try:
    return importlib.import_module("open_clip.transformer")
  finally:
    for name in stubs:  # other libraries probe for torchvision: leave no trace
      del sys.modules[name]


@pytest.fixture(scope="module")
def hps_checkpoint(tmp_path_factory):
  """An HPS v2-style checkpoint: an open_clip CLIP's state dict (towers of width 128) under "state_dict"."""
  from text_helpers import write_clip_vocab
  towers = open_clip_transformer()
  torch.manual_seed(1)
  visual = towers.VisionTransformer(image_size=32, patch_size=8, width=128, layers=2, heads=2, mlp_ratio=2.0,
                                    output_dim=48).eval()
  text = towers.TextTransformer(context_length=77, vocab_size=49408, width=128, heads=2, layers=2,
                                output_dim=48).eval()
  with torch.no_grad():
    for parameter in (*visual.parameters(), *text.parameters()):
      parameter.add_(0.02 * torch.randn_like(parameter))
  state = {**{f"visual.{k}": v for k, v in visual.state_dict().items()}, **text.state_dict(),
           "logit_scale": torch.tensor(4.6)}
  directory = tmp_path_factory.mktemp("hps")
  write_clip_vocab(str(directory))
  path = str(directory / "HPS_v2_compressed.pt")
  torch.save({"state_dict": state}, path)
  return path, visual, text


def test_open_clip_vision_tower_matches_open_clip(hps_checkpoint):
  path, visual, _ = hps_checkpoint
  vision, params = clip.load_clip_vision(path)
  assert (vision.num_heads, vision.hidden_act, vision.image_size, vision.projection_dim) == (2, "gelu", 32, 48)
  pixels = clip.clip_preprocess(_photos(), 32)
  with torch.no_grad():
    theirs = visual(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
  assert relative_error(vision.apply({"params": params}, pixels)["image_embeds"], theirs) < 1e-5


def test_evaluate_tool_gives_a_preference_score_from_an_open_clip_checkpoint(hps_checkpoint, tmp_path, capsys):
  import json
  tool = load_tool("evaluate")
  path, visual, text = hps_checkpoint
  prompts = np.array(["an astronaut", "a cup of coffee on a table", "a sleeping cat", "a rocket"])
  samples = str(tmp_path / "samples.npz")
  np.savez(samples, images=_photos(), prompts=prompts)
  assert tool.main([f"--preference={path}", samples]) == 0  # the tokenizer beside the checkpoint
  with open(tmp_path / "samples.preference.json") as f:
    results = json.load(f)
  assert f"Preference score: {results['preference_score']}" in capsys.readouterr().out
  tokenizer = transformers.CLIPTokenizer.from_pretrained(os.path.dirname(path))
  ids = tokenizer(list(prompts), padding="max_length", max_length=77, return_tensors="pt").input_ids
  with torch.no_grad():
    image = visual(torch.from_numpy(clip.clip_preprocess(_photos(), 32)).permute(0, 3, 1, 2)).numpy()
    prompt = text(ids).numpy()
  image, prompt = image.astype(np.float64), prompt.astype(np.float64)
  cos = (image * prompt).sum(1) / np.linalg.norm(image, axis=1) / np.linalg.norm(prompt, axis=1)
  np.testing.assert_allclose(results["per_image"], cos, atol=1e-6)
  assert results["preference_score"] == pytest.approx(cos.mean(), abs=1e-6)
