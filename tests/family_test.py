"""The model-family seam: every family implements the interface, consumers never import a concrete family, and
the conditioning contract (condition, null_condition, dummy_batch) holds."""
import ast
import importlib
import inspect
import json
import os
import re

import jax
import numpy as np
import pytest
from conftest import randomize

import jdit.models
from jdit.models import family

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERFACE = ("MODEL", "PRESETS", "VARIANT", "TINY", "TABLE", "table_model")  # to_layout: optional
TINY = {name: family.tiny(name) for name in family.FAMILIES}
CLASS_FAMILIES = ("dit", "unet")


def concrete_imports(source: str, filename: str) -> list[str]:
  """The concrete family modules (and names re-exported from them) that `source` imports."""
  families = {f"jdit.models.{name}": importlib.import_module(f"jdit.models.{name}") for name in family.FAMILIES}
  found = []
  for node in ast.walk(ast.parse(source, filename)):
    if isinstance(node, ast.Import):
      found += [a.name for a in node.names if any(a.name.startswith(f) for f in families)]
    elif isinstance(node, ast.ImportFrom) and node.module:
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        exported = getattr(jdit.models, alias.name, None) if node.module == "jdit.models" else None
        if any(node.module.startswith(f) or full == f for f in families) or any(
            exported is not None and not inspect.ismodule(exported) and vars(m).get(alias.name) is exported
            for m in families.values()):
          found.append(full)
  return found


def consumer_files() -> list[str]:
  """Every Python file of the library, tools and configs outside jdit/models, except the families' weight
  importers jdit/convert/<family>.py (which map a family's tensors and may name it)."""
  allowed = {os.path.join("jdit", "convert", f"{name}.py") for name in family.FAMILIES}
  files = []
  for top in ("jdit", "tools", "configs"):
    for directory, _, names in os.walk(os.path.join(ROOT, top)):
      rel = os.path.relpath(directory, ROOT)
      if rel == os.path.join("jdit", "models"):
        continue
      files += [os.path.join(rel, n) for n in names if n.endswith(".py") and os.path.join(rel, n) not in allowed]
  return sorted(files)


def test_no_consumer_imports_a_concrete_family():
  assert concrete_imports("from jdit.models import dit, family", "x.py") == ["jdit.models.dit"]
  assert concrete_imports("from jdit.models import create_dit", "x.py") == ["jdit.models.create_dit"]
  assert concrete_imports("import jdit.models.unet as u\nfrom jdit.models.unet import UNet", "x.py") == [
      "jdit.models.unet", "jdit.models.unet.UNet"]
  files = consumer_files()
  assert os.path.join("jdit", "train.py") in files and os.path.join("tools", "bench.py") in files
  offenders = {}
  for path in files:
    with open(os.path.join(ROOT, path)) as f:
      found = concrete_imports(f.read(), path)
    if found:
      offenders[path] = found
  assert not offenders, f"import the family through jdit.models.family instead: {offenders}"


@pytest.mark.parametrize("name", family.FAMILIES)
def test_every_family_implements_the_interface(name):
  module = family.get(name)
  assert all(hasattr(module, attr) for attr in INTERFACE)
  config = family.default_config(name)
  assert config.family == name
  config.update(TINY[name])
  model = family.create(config)
  assert model.FAMILY == name
  stored = json.loads(json.dumps(family.model_config(model)))  # what a checkpoint stores
  assert stored["family"] == name and family.from_config(stored) == model
  params = family.abstract_params(model)
  assert jax.tree.structure(family.to_layout(params, model)) == jax.tree.structure(params)
  assert model.describe() and model.size_multiple >= 1
  table = module.table_model(module.TABLE[0])
  assert table.FAMILY == name and (table.num_classes == 1000 if name in CLASS_FAMILIES else True)


@pytest.mark.parametrize("name", CLASS_FAMILIES)
def test_the_conditioning_contract(name):
  config = family.default_config(name)
  config.update(dict(TINY[name], num_classes=10, class_dropout_prob=0.1))
  model = family.create(config)
  batch = model.dummy_batch(3)
  assert batch["image"].shape == (3, *model.input_hw, model.in_channels) and set(batch) == {"image", "label"}
  cond = model.condition({**batch, "label": np.array([1, 2, 3]), "unrelated": np.zeros(3)})
  assert set(cond) == set(model.condition_keys) == {"label"}
  assert model.null_condition(cond)["label"].tolist() == [10, 10, 10] and model.supports_guidance
  params = model.init(jax.random.key(0), *model.dummy_inputs())["params"]
  x, t = np.random.RandomState(0).randn(*batch["image"].shape).astype(np.float32), np.full((3,), 500.0)
  via_contract = family.apply(model, params, x, t, cond)
  np.testing.assert_array_equal(via_contract, model.apply({"params": params}, x, t, cond["label"]))

  config.update(dict(num_classes=0, class_dropout_prob=0.0))
  unconditional = family.create(config)
  assert unconditional.condition_keys == () and set(unconditional.dummy_batch(2)) == {"image"}
  assert unconditional.condition({"image": x, "label": np.zeros(3)}) == {}


def test_the_text_conditioning_contract():
  """Text families read context and pooled; guidance swaps in the empty prompt's null_context / null_pooled,
  which a conditioning without them cannot do (a one-line error)."""
  model = family.create(dict(family.default_config("mmdit"), **TINY["mmdit"]))
  batch = model.dummy_batch(3)
  assert set(batch) == {"image", "context", "pooled"} and model.supports_guidance
  rng = np.random.RandomState(0)
  batch = {k: rng.randn(*v.shape).astype(np.float32) for k, v in batch.items()}
  batch.update(null_context=rng.randn(*batch["context"].shape).astype(np.float32),
               null_pooled=rng.randn(*batch["pooled"].shape).astype(np.float32))
  cond = model.condition({**batch, "label": np.zeros(3)})
  assert set(cond) == {"context", "pooled", "null_context", "null_pooled"}
  null = model.null_condition(cond)
  np.testing.assert_array_equal(null["context"], batch["null_context"])
  np.testing.assert_array_equal(null["pooled"], batch["null_pooled"])
  params = randomize(model.init(jax.random.key(0), *model.dummy_inputs())["params"])  # zero-init outputs otherwise
  x, t = batch["image"], np.full((3,), 500.0, np.float32)
  np.testing.assert_array_equal(family.apply(model, params, x, t, null),
                                model.apply({"params": params}, x, t, batch["null_context"], batch["null_pooled"]))
  with pytest.raises(ValueError, match="needs the empty prompt \\(null_context, null_pooled\\)"):
    model.null_condition(model.condition({k: batch[k] for k in ("context", "pooled")}))


def test_unknown_family_is_a_one_line_error():
  with pytest.raises(ValueError, match=f"model.family must be one of {re.escape(str(family.FAMILIES))}, got 'mmdit2'"):
    family.default_config("mmdit2")
  with pytest.raises(ValueError, match="unknown DiT variant 'Huge/2'; expected one of S/2, "):
    family.create(dict(family.default_config("dit"), variant="Huge/2"))


def test_a_text_model_with_its_own_encoder_reads_token_ids():
  """text_vocab_size > 0: the MM-DiT trains its own CLIP-style text encoder on token ids (key tokens, the empty
  caption's ids as null_tokens); the digit-scenes tokenizer gives [BOS] words [EOS] padded."""
  from jdit.data import digit_scenes
  tokens = digit_scenes.tokenize(["red three and blue seven", "green one and white two", ""])
  assert tokens.shape == (3, digit_scenes.TOKENS) and tokens[2, :2].tolist() == [1, len(digit_scenes.VOCABULARY) - 1]
  with pytest.raises(ValueError, match="outside the digit-scenes vocabulary: cat"):
    digit_scenes.tokenize(["red cat"])
  model = family.create(dict(family.default_config("mmdit"), variant="tiny", in_channels=3, out_channels=3,
                             input_size=(8, 16), text_vocab_size=len(digit_scenes.VOCABULARY),
                             text_eos_id=len(digit_scenes.VOCABULARY) - 1))
  assert model.condition_keys == ("tokens",) and set(model.dummy_batch(2)) == {"image", "tokens"}
  params = randomize(model.init(jax.random.key(0), *model.dummy_inputs())["params"])
  assert "text_encoder" in params
  x, t = np.random.RandomState(0).randn(3, 8, 16, 3).astype(np.float32), np.full((3,), 500.0, np.float32)
  cond = model.condition({"tokens": tokens, "null_tokens": np.repeat(tokens[2:], 3, 0)})
  out = np.asarray(family.apply(model, params, x, t, cond))
  null = np.asarray(family.apply(model, params, x, t, model.null_condition(cond)))
  assert out.shape == (3, 8, 16, 3) and not np.allclose(out[0], out[1])
  np.testing.assert_allclose(null[2], out[2], rtol=1e-6)  # the empty caption is its own null
