"""Reliability III, the inputs: garbage weight files are one-line errors naming the file in every loader (the
safetensors header is checked against the file before anything is allocated); sampling inputs that do not fit the
model are refused; config files that do not import, raise or return no config are one line; SIGTERM before the
training loop exits 75."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import randomize
from train_test import ROOT, tiny_config

from jdit import checkpoint, config_check, convert, lora, sample
from jdit.convert.vae import load_vae
from jdit.eval.clip import load_clip_vision
from jdit.eval.features import load_inception
from jdit.models import family
from jdit.state_dict import CheckpointError
from jdit.text.weights import load_text_encoder


def _write(path, content: bytes) -> str:
  path.write_bytes(content)
  return str(path)


def _header_file(path, header, data: bytes = b"") -> str:
  raw = json.dumps(header).encode()
  return _write(path, len(raw).to_bytes(8, "little") + raw + data)


GARBAGE = {
    "random bytes": lambda p: _write(p, np.random.default_rng(0).bytes(4096)),
    "huge header": lambda p: _write(p, (2 ** 63).to_bytes(8, "little") + b"{}"),
    "shape past the data": lambda p: _header_file(p, {"w": {"dtype": "F32", "shape": [10 ** 6, 10 ** 6],
                                                            "data_offsets": [0, 16]}}, bytes(16)),
    "offsets past the end": lambda p: _header_file(p, {"w": {"dtype": "F32", "shape": [4],
                                                             "data_offsets": [0, 2 ** 40]}}, bytes(16)),
    "unknown dtype": lambda p: _header_file(p, {"w": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}},
                                            bytes(16)),
    "a header that is a list": lambda p: _header_file(p, [1, 2, 3]),
}
LOADERS = {
    "load_checkpoint": convert.load_checkpoint, "load_dit_checkpoint": convert.load_dit_checkpoint,
    "load_unet_checkpoint": convert.load_unet_checkpoint, "load_mmdit_checkpoint": convert.load_mmdit_checkpoint,
    "load_flux_checkpoint": convert.load_flux_checkpoint, "load_vae": load_vae,
    "load_text_encoder": load_text_encoder, "load_inception": load_inception, "load_clip_vision": load_clip_vision,
    "lora.describe_file": lora.describe_file,
}


@pytest.mark.parametrize("kind", GARBAGE)
def test_every_loader_turns_a_garbage_file_into_one_line_naming_it(tmp_path, kind):
  path = GARBAGE[kind](tmp_path / "weights.safetensors")
  for name, loader in LOADERS.items():
    with pytest.raises(CheckpointError) as info:
      loader(path)
    message = str(info.value)
    assert path in message and "\n" not in message, (name, message)
    assert "not a readable safetensors file" in message, (name, message)


def test_sampling_inputs_that_do_not_fit_the_model_are_refused(tmp_path):
  config = tiny_config()
  model = family.create(config.model)
  params = randomize(model.init(jax.random.key(0), *model.dummy_inputs())["params"])
  directory = str(tmp_path / "checkpoints")
  checkpoint.save_pretrained(directory, model, jax.tree.map(np.asarray, params))
  given = cli("--config=configs/digits.py", f"--workdir={tmp_path}", "--mode=sample", "--config.model.hidden_size=48")
  for changes, message in [({"sample.classes": (3, 11)}, r"sample.classes=\(3, 11\): DiT\(.*\) has classes 0 to 9"),
                           ({"sample.prompts": ("a red three",)}, "sample.prompts: DiT.* is not text-conditioned"),
                           ({"sample.resolution": (32, 40)}, r"more than 16x the area of the 8x8 images")]:
    with pytest.raises(ValueError, match=message):
      sample.sample_and_save(tiny_config(**changes), str(tmp_path))
  for fields, message in [({"hidden_size": 64}, "config.model.hidden_size=64: .* with hidden_size=32;"),
                          ({"variant": "XL/2"}, r"config.model.variant='XL/2' \(depth=28\): .* with depth=2;")]:
    with pytest.raises(ValueError, match=message):  # model fields the command line gave, not the checkpoint's
      sample.sample_and_save(tiny_config(), str(tmp_path), given=fields)
  sample.check_architecture(model, {"hidden_size": 32, "dtype": "bfloat16", "remat": True}, directory)
  assert not (tmp_path / "samples.npz").exists()
  _, err = given.communicate(timeout=300)
  assert given.returncode == 1 and err.strip().splitlines()[-1].startswith(
      f"error: config.model.hidden_size=48: {directory} holds a 'dit' model with hidden_size=32;"), err[-2000:]
  for changes, message in [({"diffusion.guidance_scale": float("inf")}, "diffusion.guidance_scale=inf: expected"),
                           ({"sample.aspect_ratio": "1000000000:1"}, "at most 16:1 either way")]:
    with pytest.raises(ValueError, match=message):
      config_check.validate(tiny_config(**changes), "sample", str(tmp_path))


def cli(*args, **kwargs):
  return subprocess.Popen([sys.executable, "-m", "jdit.main", *args], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), **kwargs)


@pytest.mark.parametrize("source,message", [
    ("def get_config(:\n  pass\n", "line 1: invalid syntax"),
    ("def get_config():\n  raise RuntimeError('boom')\n", "get_config\\(\\) raised RuntimeError: boom"),
    ("def get_config():\n  return 3\n", "get_config\\(\\) returned int, not an ml_collections ConfigDict"),
    ("x = 1\n", "defines no get_config\\(\\)"),
])
def test_config_files_that_fail_are_one_line(tmp_path, source, message):
  (tmp_path / "bad.py").write_text(source)
  _, err = cli(f"--config={tmp_path / 'bad.py'}", f"--workdir={tmp_path / 'w'}").communicate(timeout=120)
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-2000:]
  assert err.startswith(f"error: --config={tmp_path / 'bad.py'}: ") and re.search(message, err), err


def test_sigterm_before_the_training_loop_exits_75_and_leaves_nothing(tmp_path):
  process = cli("--config=configs/digits.py", f"--workdir={tmp_path / 'w'}")
  time.sleep(1.0)  # importing: long before the loop
  process.send_signal(signal.SIGTERM)
  _, err = process.communicate(timeout=120)
  assert process.returncode == 75, err[-2000:]
  assert err.strip().splitlines()[-1].startswith("SIGTERM before training started") and not (tmp_path / "w").exists()


SWALLOWED = """
import gc, os, signal, time
from jdit import main
def callback(phase, info):  # SIGTERM lands inside a garbage-collection callback (as JAX registers): dropped there
  gc.callbacks.remove(callback)
  os.kill(os.getpid(), signal.SIGTERM)
gc.callbacks.append(callback)
gc.collect()
print("went on", flush=True)
try:
  time.sleep(30)
except main.Stopped as e:
  print("raised again:", e)
"""


def test_a_sigterm_a_callback_dropped_is_raised_again():
  done = subprocess.run([sys.executable, "-c", SWALLOWED], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert "Exception ignored" in done.stderr and "Stopped: SIGTERM before training" in done.stderr, done.stderr
  assert done.stdout.splitlines() == ["went on", "raised again: SIGTERM before training started or after it ended: "
                                      "nothing needed saving; run the same command again to go on"], done.stdout


def test_sigterm_outside_training_says_what_the_mode_left(monkeypatch):
  from jdit import main
  monkeypatch.setattr(main._stop, "requested", False)  # back to False afterwards: this process trains in other tests
  for mode, said in [("sample", r"SIGTERM while sampling: nothing written \(samples.npz appears only when complete\)"),
                     ("fid_samples", "SIGTERM while writing the FID set: its finished shards are kept")]:
    monkeypatch.setattr(main, "FLAGS", type("Parsed", (), {"mode": mode, "is_parsed": lambda self: True})())
    try:
      with pytest.raises(main.Stopped, match=f"^{said}; run the same command again"):
        main._stop(signal.SIGTERM, None)
    finally:
      signal.setitimer(signal.ITIMER_REAL, 0)  # no retry: caught
  from jdit.train import _Preemption
  assert signal.getsignal(signal.SIGTERM) is main._stop and main._stop.requested
  preemption = _Preemption()  # a loop starting now checkpoints at its first step and exits 75
  preemption.restore()
  assert preemption.requested and signal.getsignal(signal.SIGTERM) is main._stop


# ----------------------------------------------------------------------------------------------
#                     Writers: settings claimed, partial and stale shards never read
# ----------------------------------------------------------------------------------------------

class FakeEncoder:
  """A text encoder of the TextEncoderSpec interface whose output is all ones (the writer is under test)."""

  def __init__(self, width: int):
    self.name, self.width = "fake", width

  def describe(self) -> dict:
    return {"max_length": 4, "width": self.width}

  def encode(self, prompts) -> dict:
    n = len(prompts)
    return {"sequence": np.ones((n, 4, self.width), np.float32), "length": np.full((n,), 4, np.int32),
            "pooled": np.ones((n, self.width), np.float32)}


def test_caches_refuse_to_resume_under_other_settings(tmp_path):
  from jdit.data import records, text_cache, writers
  from jdit.data.digits import DigitsSource
  captions = [{"caption": f"digit {i}"} for i in range(5)]
  text_cache.encode_captions(captions, [FakeEncoder(8)], str(tmp_path / "text"), num_shards=2, log=lambda _: None)
  for changes, message in [(dict(specs=[FakeEncoder(16)]), "--encoder=.*'width': 16.*with --encoder=.*'width': 8"),
                           (dict(dtype="float32"), "--dtype='float32': .* written with --dtype='bfloat16'"),
                           (dict(num_shards=3), "--num_shards=3: .* written with --num_shards=2")]:
    arguments = dict(specs=[FakeEncoder(8)], num_shards=2) | changes
    with pytest.raises(ValueError, match=message + ".*to start over"):
      text_cache.encode_captions(captions, arguments.pop("specs"), str(tmp_path / "text"), log=lambda _: None,
                                 **arguments)
  digits = [DigitsSource()[i] for i in range(3)]
  encode = lambda images: (np.zeros((len(images), 4, 4, 4)), np.zeros((len(images), 4, 4, 4)))  # noqa: E731
  options = dict(scaling_factor=0.5, shift_factor=0.0, num_shards=2, log=lambda _: None, identity={"vae": "a"})
  assert writers.extract_latents(digits, encode, str(tmp_path / "latents"), image_size=8, **options)
  with pytest.raises(ValueError, match="--image_size=16: .* written with --image_size=8"):
    writers.extract_latents(digits, encode, str(tmp_path / "latents"), image_size=16, **options)
  with pytest.raises(ValueError, match="--vae='b': .* written with --vae='a'"):
    writers.extract_latents(digits, encode, str(tmp_path / "latents"), image_size=8,
                            **options | {"identity": {"vae": "b"}})
  with pytest.raises(ValueError, match="--batch_size=0: expected an integer >= 1"):
    writers.extract_latents(digits, encode, str(tmp_path / "other"), image_size=8, batch_size=0, **options)
  assert records.read_json(str(tmp_path / "latents"), records.LATENT_META)["image_size"] == 8


def test_image_folder_conversion_replaces_stale_shards_and_ignores_partial_ones(tmp_path):
  from data_test import make_image_folder
  from jdit.data import writers
  from jdit.data.folder import open_folder
  count = make_image_folder(tmp_path / "images")
  quiet = dict(log=lambda _: None)
  writers.convert_folder(str(tmp_path / "images"), str(tmp_path / "out"), num_shards=4, **quiet)
  writers.convert_folder(str(tmp_path / "images"), str(tmp_path / "out"), num_shards=2, **quiet)
  (tmp_path / "out" / "train.array_record-00000-of-00009.tmp").write_bytes(b"half a shard")  # a killed rerun's
  assert len(open_folder(str(tmp_path / "out"), "train")) == count  # each image once
  assert sorted(os.listdir(tmp_path / "out"))[:2] == ["jdit_folder.json", "train.array_record-00000-of-00002"]
  (tmp_path / "broken" / "a").mkdir(parents=True)
  (tmp_path / "broken" / "a" / "x.png").write_bytes(b"not a png")
  (tmp_path / "no_images" / "a").mkdir(parents=True)
  (tmp_path / "no_images" / "a" / "notes.txt").write_text("not an image")
  for args, error, message in [
      ((tmp_path / "images", tmp_path / "o1", 0), ValueError, "--num_shards=0: expected an integer >= 1"),
      ((tmp_path / "images", tmp_path / "out" / "jdit_folder.json", 2), ValueError, "is a file, not a directory"),
      ((tmp_path / "broken", tmp_path / "o2", 2), FileNotFoundError, "none of its 1 image files is readable"),
      ((tmp_path / "no_images", tmp_path / "o3", 2), FileNotFoundError, r"no images \(.jpg, .*\) in class sub-fold")]:
    with pytest.raises(error, match=message):
      writers.convert_folder(str(args[0]), str(args[1]), num_shards=args[2], **quiet)
  assert not os.listdir(tmp_path / "o2")
  from PIL import Image
  (tmp_path / "captioned").mkdir()
  for name in ("a.png", "b.png"):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "captioned" / name)
  (tmp_path / "captioned" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a black square"}\n')
  logged = []
  counts = writers.convert_folder(str(tmp_path / "captioned"), str(tmp_path / "o3"), log=logged.append)
  assert (counts["written"], counts["uncaptioned"]) == (1, 1)  # counted and said, not dropped silently
  assert "1 images have no caption in metadata.jsonl: left out" in logged


def test_tools_answer_bad_arguments_in_one_line(tmp_path, capsys):
  from conftest import load_tool
  np.savez(tmp_path / "rgb.npz", images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.zeros(4, np.int32))
  np.savez(tmp_path / "unlabelled.npz", images=np.zeros((4, 8, 8, 1), np.uint8))
  np.savez(tmp_path / "objects.npz", images=np.array([None, 1], dtype=object), labels=np.zeros(2))
  model = family.create(tiny_config().model)
  params = randomize(model.init(jax.random.key(0), *model.dummy_inputs())["params"])
  weights = checkpoint.save_pretrained(str(tmp_path / "weights"), model, jax.tree.map(np.asarray, params))
  cases = [
      ("eval_digits", [f"--samples={tmp_path / 'rgb.npz'}"], "holds uint8 images of shape (8, 8, 3)"),
      ("eval_digits", [f"--samples={tmp_path / 'unlabelled.npz'}"], "'labels is not a file in the archive'"),
      ("eval_digits", [f"--samples={tmp_path / 'objects.npz'}"], "Object arrays cannot be loaded"),
      ("sampler_quality", ["--workdir=nowhere", "--samplers=bogus"], "--samplers=bogus: expected gaussian samplers"),
      ("sampler_quality", ["--workdir=nowhere", "--steps=0"], "--steps=0: expected comma-separated integers >= 1"),
      ("convert_checkpoint", [f"--src={weights}", f"--out={tmp_path / 'out'}", "--override=bogus=1"],
       f"error: {weights} holds a 'dit' model: unknown DiT config field(s): bogus"),
  ]
  for tool, argv, message in cases:
    assert load_tool(tool).main(argv) == 2, (tool, argv)
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, (tool, argv, err)


def test_init_from_a_checkpoint_of_another_family_names_the_path(tmp_path):
  model = family.create(dict(family.default_config("unet"), **family.tiny("unet")))
  params = jax.jit(model.init)(jax.random.key(0), *model.dummy_inputs())["params"]
  unet = checkpoint.save_pretrained(str(tmp_path / "unet"), model, jax.tree.map(np.asarray, nn.unbox(params)))
  with pytest.raises(CheckpointError, match=f"^{unet} holds a 'unet' model: unknown UNet config field"):
    convert.load_into(unet, family.create(tiny_config().model))  # what config.init_from reads
