"""The files of one checkpoint step: a manifest of their sizes written when the step is finished, the check of a
step against it, one-line descriptions of read errors naming the file, and moving an unreadable step aside.

    write_manifest("ckpt/600")          # after Orbax finished the step
    damaged_file("ckpt/600")            # "train/ocdbt.process_0/d/8e49...: 32609 bytes, 53230 written" or None
    move_aside("ckpt/600")              # -> "ckpt/600.corrupt" (never deleted; Orbax ignores the name)
A manifest catches what preempted pods and full disks leave (truncated, missing or replaced files) before Orbax
reads anything; content damage that keeps the size shows up as a read error, which `describe_error` names.
"""
import json
import os
import re

MANIFEST = "jdit_files.json"
CORRUPT_SUFFIX = ".corrupt"


def write_manifest(step_dir: str) -> None:
  """Records the size of every file of a finished step (written atomically, beside Orbax's files)."""
  sizes = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(root, name)
      relative = os.path.relpath(path, step_dir)
      if relative != MANIFEST:
        sizes[relative] = os.path.getsize(path)
  temporary = os.path.join(step_dir, MANIFEST + ".tmp")
  with open(temporary, "w") as f:
    json.dump({"files": dict(sorted(sizes.items()))}, f)
  os.replace(temporary, os.path.join(step_dir, MANIFEST))


def damaged_file(step_dir: str) -> str | None:
  """'FILE: what is wrong' for the first file of the step that differs from its manifest; None when all match
  or the step has no manifest (written before manifests existed, or killed before it was written)."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      sizes = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{MANIFEST}: unreadable ({type(e).__name__})"
  for relative, size in sizes.items():
    file = os.path.join(step_dir, relative)
    if not os.path.isfile(file):
      return f"{relative}: missing"
    actual = os.path.getsize(file)
    if actual != size:
      return f"{relative}: {actual} bytes, {size} written"
  return None


def describe_error(error: BaseException, step_dir: str, item: str) -> str:
  """One line for an exception raised while reading `item` of a step: the file it names (a path under the step
  found in the exception or its causes, else the item's directory), the error type and its first line."""
  chain, cause = [], error
  while cause is not None and len(chain) < 8:
    chain.append(cause)
    cause = cause.__cause__ or cause.__context__
  step_dir = os.path.abspath(step_dir)
  where = None
  for exc in chain:
    found = re.search(re.escape(step_dir) + r"/([^\"'\s:]+)", f"{exc} {getattr(exc, 'filename', '') or ''}")
    if found:
      where = found.group(1)
      break
  if where is None or where.rstrip("/") == item:
    where = _unparsable_json(step_dir, item) or where or item + "/"
  root = chain[-1]  # the innermost error says what went wrong (Orbax wraps it in generic ones)
  text = str(root).strip().splitlines()[0] if str(root).strip() else ""
  text = text if len(text) <= 240 else text[:237] + "..."
  return f"{where}: {type(root).__name__}{': ' + text if text else ''}"


def _unparsable_json(step_dir: str, item: str) -> str | None:
  """The first of the item's JSON files (Orbax's metadata, the model config, iterator states) that does not
  parse, relative to the step; array data (OCDBT) and text markers are skipped."""
  for root, dirs, names in os.walk(os.path.join(step_dir, item)):
    dirs[:] = sorted(d for d in dirs if d != "d")
    for name in sorted(names):
      if name.endswith((".txt", ".ocdbt")):
        continue
      path = os.path.join(root, name)
      try:
        with open(path, encoding="utf-8") as f:
          json.load(f)
      except (OSError, ValueError):
        return os.path.relpath(path, step_dir)
  return None


def move_aside(step_dir: str) -> str:
  """Renames an unreadable step to STEP.corrupt (STEP.corrupt2, ... when taken); returns the new path."""
  target, n = step_dir + CORRUPT_SUFFIX, 1
  while os.path.exists(target):
    n += 1
    target = f"{step_dir}{CORRUPT_SUFFIX}{n}"
  os.rename(step_dir, target)
  return target
