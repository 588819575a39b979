"""The text-embedding cache end to end: a captioned imagefolder -> captioned records -> tools/encode_text.py with
a CLIP and a T5 encoder (weights and tokenizers in transformers directories) -> per-record embeddings equal to
transformers' on the same captions, the empty prompt, resume after a lost shard, and one-line errors."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import relative_error
from PIL import Image

from jdit.data import writers
from jdit.data.folder import open_folder
from jdit.data import text_cache as cache
from text_helpers import PROMPTS, clip_config, perturbed, t5_config, write_clip_vocab, write_spiece

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = PROMPTS[1:10] + ["a red square", "a blue circle"]


def _captioned_folder(path) -> None:
  os.makedirs(path / "images")
  with open(path / "metadata.jsonl", "w", encoding="utf-8") as f:
    for i, caption in enumerate(CAPTIONS):
      Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(path / "images" / f"{i}.png")
      f.write(json.dumps({"file_name": f"images/{i}.png", "text": caption}) + "\n")


def _encoders(path) -> dict:
  """transformers directories holding weights and tokenizer files: a CLIP text tower and a T5 encoder."""
  clip = perturbed(transformers.CLIPTextModelWithProjection(clip_config()))
  clip.save_pretrained(path / "clip")
  write_clip_vocab(str(path / "clip"))
  t5 = perturbed(transformers.T5EncoderModel(t5_config()), seed=1)
  t5.save_pretrained(path / "t5")
  write_spiece(str(path / "t5"))
  return {"clip": clip, "t5": t5}


def _reference(models: dict, path, prompts: list[str]) -> dict:
  """The cache's arrays computed by transformers: CLIP's penultimate state + projected pooled, T5's last state
  with the padding mask."""
  out = {}
  tok = transformers.CLIPTokenizer.from_pretrained(str(path / "clip"))
  ids = tok(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
  with torch.no_grad():
    clip = models["clip"](ids["input_ids"], output_hidden_states=True)
  out.update({"clip.sequence": clip.hidden_states[-2].numpy(), "clip.pooled": clip.text_embeds.numpy(),
              "clip.length": ids["attention_mask"].sum(-1).numpy()})
  tok = transformers.T5Tokenizer.from_pretrained(str(path / "t5"))
  ids = tok(prompts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
  with torch.no_grad():
    t5 = models["t5"](ids["input_ids"], attention_mask=ids["attention_mask"])
  out.update({"t5.sequence": t5.last_hidden_state.numpy(), "t5.length": ids["attention_mask"].sum(-1).numpy()})
  return out


def _run_tool(args: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "encode_text.py"), *args],
                        capture_output=True, text=True, timeout=300)


def test_encode_text_cache(tmp_path):
  _captioned_folder(tmp_path / "folder")
  counts = writers.convert_folder(str(tmp_path / "folder"), str(tmp_path / "records"), num_shards=2,
                                  log=lambda _: None)
  assert counts == {"written": len(CAPTIONS), "skipped": 0, "uncaptioned": 0, "classes": 0, "captioned": True}
  models = _encoders(tmp_path)
  out = tmp_path / "text"
  args = [f"--data_dir={tmp_path / 'records'}", f"--out={out}", f"--encoder=clip={tmp_path / 'clip'}",
          f"--encoder=t5={tmp_path / 't5'},max_length=16,mask=1", "--dtype=float32", "--num_shards=3",
          "--batch_size=4"]
  result = _run_tool(args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "captions/s" in result.stdout and "done: 11 captions encoded" in result.stdout

  meta = json.load(open(out / cache.TEXT_META))
  assert meta["count"] == len(CAPTIONS) and meta["encoders"]["clip"]["layer"] == "penultimate"
  assert meta["encoders"]["t5"] == {"kind": "t5", "width": 64, "max_length": 16, "layer": "last", "use_mask": True,
                                    "pooled_dim": 0, "pooled_only": False, "weights": str(tmp_path / "t5"),
                                    "tokenizer": str(tmp_path / "t5")}
  source = open_folder(str(tmp_path / "records"), "train")
  captions = [source[i]["caption"] for i in range(len(source))]
  assert sorted(captions) == sorted(CAPTIONS)
  want = _reference(models, tmp_path, captions)
  text = cache.open_text_cache(str(out))
  records = sorted((text[i] for i in range(len(text))), key=lambda r: r["index"])
  assert [r["index"] for r in records] == list(range(len(CAPTIONS)))
  for key, reference in want.items():
    got = np.stack([r[key] for r in records])
    if key.endswith("length"):
      np.testing.assert_array_equal(got, reference)
    else:
      assert relative_error(got, reference) <= 1e-5, key
  empty = cache.load_empty_prompt(str(out))
  for key, reference in _reference(models, tmp_path, [""]).items():
    assert relative_error(empty[key], reference[0]) <= 1e-5, key

  # A lost shard is encoded again, the others are skipped; the result is the same.
  shard = cache.shard_paths(str(out), "train", 3)[1]
  before = open(shard, "rb").read()
  os.remove(shard)
  os.remove(out / cache.TEXT_META)
  assert _tool().main(args) == 0
  assert open(shard, "rb").read() == before and os.path.exists(out / cache.TEXT_META)


def _tool():
  """tools/encode_text.py as a module, to call main() without a new interpreter."""
  spec = importlib.util.spec_from_file_location("encode_text", os.path.join(ROOT, "tools", "encode_text.py"))
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  return tool


def test_encode_text_errors(tmp_path, capsys):
  _captioned_folder(tmp_path / "folder")
  writers.convert_folder(str(tmp_path / "folder"), str(tmp_path / "records"), log=lambda _: None)
  (tmp_path / "classes" / "a").mkdir(parents=True)
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "classes" / "a" / "0.png")
  writers.convert_folder(str(tmp_path / "classes"), str(tmp_path / "uncaptioned"), log=lambda _: None)
  write_clip_vocab(str(tmp_path / "clip"))
  transformers.CLIPTextModel(clip_config(num_hidden_layers=1)).save_pretrained(tmp_path / "clip")
  cases = {"--encoder=clip": "expected NAME=WEIGHTS",
           f"--encoder=clip={tmp_path},size=3": "unknown option 'size=3'",
           f"--encoder=clip={tmp_path / 'missing'}": "missing: no such file or directory",
           f"--pipeline={tmp_path}": "not a diffusers pipeline directory",
           f"--encoder=clip={tmp_path / 'clip'},max_length=100": "max_length=100 exceeds the encoder's 77 positions",
           f"--encoder=clip={tmp_path / 'clip'},max_length=0": "max_length=0 must be at least 1",
           f"--encoder=clip={tmp_path / 'clip'},tokenizer={tmp_path}": "no tokenizer found",
           "uncaptioned": "the dataset has no captions"}
  tool = _tool()
  capsys.readouterr()
  for flag, message in cases.items():
    data = tmp_path / ("uncaptioned" if flag == "uncaptioned" else "records")
    flag = f"--encoder=clip={tmp_path / 'clip'}" if flag == "uncaptioned" else flag
    assert tool.main([f"--data_dir={data}", f"--out={tmp_path / 'out'}", flag]) == 2, flag
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, (flag, err)
  assert not os.listdir(tmp_path / "out") if os.path.exists(tmp_path / "out") else True


def test_caption_files_beside_images(tmp_path):
  """The .txt convention: NAME.txt beside NAME.png; images without a caption are left out."""
  for i, caption in enumerate(["first caption", "second caption"]):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / f"{i}.txt").write_text(caption + "\n")
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "uncaptioned.png")
  writers.convert_folder(str(tmp_path), str(tmp_path / "records"), log=lambda _: None)
  source = open_folder(str(tmp_path / "records"), "train")
  assert sorted(source[i]["caption"] for i in range(len(source))) == ["first caption", "second caption"]
  assert source[0]["label"] == 0 and source[0]["image"][:4] == b"\x89PNG"
