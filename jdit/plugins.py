"""Plug-ins by name: the registries of model families (jdit.models.family) and data sources (jdit.data.sources)
map each built-in name to its module; any other name is the import path of a module of the same shape, so a
family or a source written in one file of your own works without editing jdit:

    --config.model.family=my_project.my_family     --config.data.source=my_project.my_source
"""
import importlib


def load(field: str, builtins: dict[str, str], name: str, required: tuple[str, ...]):
  """The module of plug-in `name`: a built-in's, else `name` imported; ValueError naming `field` when it is
  neither or lacks one of the `required` attributes."""
  if name in builtins:
    return importlib.import_module(builtins[name])
  module = None
  if isinstance(name, str) and name and not name.startswith("."):
    try:
      module = importlib.import_module(name)
    except ModuleNotFoundError as e:  # the module itself is missing (an import inside it that fails is raised)
      if not (e.name and (name == e.name or name.startswith(e.name + "."))):
        raise
  missing = [a for a in required if not hasattr(module, a)] if module is not None else list(required)
  if module is None or missing:
    raise ValueError(f"{field} must be one of {tuple(builtins)}, got {name!r} (or the import path of a module "
                     f"that defines {', '.join(required)})")
  return module


def known(builtins: dict[str, str], name: str, required: tuple[str, ...]) -> bool:
  """Whether `name` loads as a plug-in."""
  try:
    load("", builtins, name, required)
  except ValueError:
    return False
  return True
