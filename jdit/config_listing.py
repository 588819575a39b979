"""Every field of a config with its value and its comment, read from where the field is declared: the run's
fields in jdit/config.py, the diffusion fields in jdit/diffusion/objective.py, a model family's on its flax module.
What `python -m jdit.main --config=FILE --mode=config` prints.

    print(listing(config))    # model.depth = None -> 4 (the preset's)   # ...
"""
import inspect
import re

from jdit import config as config_lib
from jdit import config_check
from jdit.diffusion import objective
from jdit.models import family

_SECTION = re.compile(r"^\s*(?:c\.(\w+) = )?(?:return )?ml_collections\.ConfigDict\(dict\((.*)$")
_ASSIGN = re.compile(r"^\s*c\.([\w.]+)\s*=")
_CLASS_FIELD = re.compile(r"^\s*(\w+):\s*[^=]+=")
_KEYWORD = re.compile(r"(\w+)=")
_CONTINUATION_INDENT = 12  # a comment line indented further continues the comment of the line above


def declared_comments(source: str, section: str = "") -> dict[str, str]:
  """{field path: comment} of the fields declared one per line in `source` (c.FIELD = ..., keyword arguments of
  ml_collections.ConfigDict(dict(...)) sections, or dataclass fields NAME: TYPE = ...), their trailing comments
  joined with the continuation lines below and the comment lines right above."""
  comments, pending, last, open_section = {}, [], [], None
  for line in source.splitlines():
    stripped = line.strip()
    if stripped.startswith("#"):
      text = stripped.lstrip("#").strip()
      if last and len(line) - len(line.lstrip()) > _CONTINUATION_INDENT:
        for key in last:
          comments[key] = f"{comments[key]} {text}".strip()
      else:
        pending, last = pending + [text], []
      continue
    code, _, comment = line.partition("  #")
    keys = []
    if match := _SECTION.match(code):
      open_section = match.group(1) or section
      keys = [f"{open_section}.{k}" for k in _KEYWORD.findall(match.group(2))]
      keys = keys + [open_section] if match.group(1) else keys
      open_section = None if "))" in match.group(2) else open_section
    elif open_section and code.strip().startswith("))"):
      open_section = None
    elif open_section:
      keys = [f"{open_section}.{k}" for k in _KEYWORD.findall(code)]
    elif match := _ASSIGN.match(code) or _CLASS_FIELD.match(code):
      keys = [f"{section}.{match.group(1)}" if section else match.group(1)]
    text = ": ".join(t for t in (" ".join(pending), comment.strip()) if t)  # a heading above, then its own
    for key in keys:
      comments[key] = text
    pending, last = ([], keys) if keys or not stripped else (pending, last)
  return comments


def field_comments(config) -> dict[str, str]:
  """{field path: comment} of every field of `config` that is declared with one."""
  module = family.get(config.model.family)
  comments = declared_comments(inspect.getsource(config_lib.base))
  comments.update(declared_comments(inspect.getsource(objective.default_config), "diffusion"))
  comments.update(declared_comments(inspect.getsource(module.MODEL), "model"))
  comments["model.family"] = "the model family: " + ", ".join(family.FAMILIES) + ", or a family module's import path"
  comments["model.variant"] = "the preset: " + ", ".join(module.PRESETS)
  return comments


def listing(config) -> str:
  """One line per field: `path = value  # comment`; a model field left to its preset shows the preset's value."""
  comments = field_comments(config)
  model = family.create(config.model)
  lines = []
  for path, value in config_check.leaves(config):
    shown = repr(value)
    if path.startswith("model.") and value is None:
      shown = f"None -> {getattr(model, path[len('model.'):])!r} (the preset's)"
    comment = comments.get(path, "")
    lines.append(f"{path} = {shown}" + (f"  # {comment}" if comment else ""))
  return "\n".join(lines)
