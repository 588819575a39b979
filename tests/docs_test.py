"""The README and the guides under docs/ work as written: every Python block runs (a block that needs files you
download first starts with `# needs: WHAT` and is only compiled), and every shell command names config files,
config fields, tools, tool flags and make targets that exist. Links between the guides resolve. Every tool's
--help prints its whole description."""
import glob
import os
import re
import shlex

import pytest
from conftest import load_config, load_tool

from jdit import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
MAIN_FLAGS = ("--config", "--workdir", "--mode", "--distributed", "--coordinator_address", "--num_processes",
              "--process_id", "--helpfull", "--help")


def blocks(language: str) -> list[tuple[str, str]]:
  """(page:line, code) of every fenced block of `language` in the README and the guides."""
  found = []
  for page in PAGES:
    with open(os.path.join(ROOT, page)) as f:
      text = f.read()
    for match in re.finditer(rf"```{language}\n(.*?)```", text, re.S):
      found.append((f"{page}:{text[:match.start()].count(chr(10)) + 1}", match.group(1)))
  return found


def test_the_pages_exist_and_the_readme_is_a_front_page():
  assert len(PAGES) >= 8
  with open(os.path.join(ROOT, "README.md")) as f:
    assert len(f.read().splitlines()) <= 300


def test_python_blocks_run(tmp_path, monkeypatch):
  """The runnable blocks, each in a fresh namespace, in a scratch directory (a failure names the block)."""
  runnable, compiled = [], 0
  for where, code in blocks("python"):
    program = compile(code, where, "exec")  # every block is valid Python
    if code.startswith("# needs:"):
      assert code.split("\n", 1)[0][len("# needs:"):].strip(), f"{where}: say what the block needs"
      compiled += 1
    else:
      runnable.append((where, program))
  assert len(runnable) >= 6 and compiled >= 3
  monkeypatch.chdir(tmp_path)
  for where, program in runnable:
    try:
      exec(program, {"__name__": "doc_block"})
    except Exception as e:
      raise AssertionError(f"{where} fails: {type(e).__name__}: {e}") from e


def commands() -> list[tuple[str, list[str]]]:
  """(page:line, argv) of every python / make command in the shell blocks (continuations joined, comments,
  environment assignments and [optional] brackets dropped)."""
  found = []
  for where, code in blocks("bash"):
    for line in code.replace("\\\n", " ").splitlines():
      line = line.split(" #", 1)[0].replace("[", "").replace("]", "").strip()
      if not line or line.startswith("#"):
        continue
      for command in line.split("&&"):
        argv = shlex.split(command)
        while argv and re.match(r"^[A-Z_]+=", argv[0]):
          argv = argv[1:]
        if argv and argv[0] in ("python", "python3", "make"):
          found.append((where, argv))
  return found


def tool_flags(path: str) -> set[str]:
  with open(path) as f:
    source = f.read()
  flags = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", source))
  flags |= {f"--{name}" for name in re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", source)}  # absl flags
  return flags | {f"--no-{flag[2:]}" for flag in flags}


def check_config_flags(where: str, argv: list[str], known: set[str], program: str) -> None:
  """Flags of a program taking an ml_collections --config (jdit.main, tools/aot_compile.py): each known, the
  config file there, and each --config.FIELD a field of it."""
  options = dict(a.split("=", 1) if "=" in a else (a, "") for a in argv if a.startswith("--"))
  for flag in options:
    assert flag in known or flag.startswith("--config."), f"{where}: {program} has no flag {flag}"
  if options.get("--mode"):
    assert options["--mode"] in ("train", "sample", "fid_samples", "config"), f"{where}: --mode={options['--mode']}"
  if "--config" not in options:
    return
  name, _, arg = options["--config"].partition(":")
  assert name.startswith("configs/") and os.path.isfile(os.path.join(ROOT, name)), f"{where}: no {name}"
  config = load_config(os.path.basename(name), *([arg] if arg else []))
  for flag in options:
    if flag.startswith("--config."):
      node = config
      for part in flag[len("--config."):].split("."):
        assert part in node, f"{where}: {flag}: {name} has no field {part!r}"
        node = node[part]


def test_shell_commands_name_what_exists():
  found = commands()
  assert len(found) >= 30
  with open(os.path.join(ROOT, "Makefile")) as f:
    targets = set(re.findall(r"^([\w-]+):", f.read(), re.M))
  for where, argv in found:
    if argv[0] == "make":
      assert all(t in targets for t in argv[1:] if "=" not in t), f"{where}: make {argv[1:]}"
    elif argv[1:3] == ["-m", "jdit.main"]:
      check_config_flags(where, argv[3:], set(MAIN_FLAGS), "jdit.main")
    else:
      tool = os.path.join(ROOT, argv[1])
      assert argv[1].startswith("tools/") and os.path.isfile(tool), f"{where}: no {argv[1]}"
      flags = tool_flags(tool)
      if "--config" in flags:
        check_config_flags(where, argv[2:], flags, argv[1])
        continue
      for arg in argv[2:]:
        if arg.startswith("--") and arg != "--help":
          assert arg.split("=", 1)[0] in flags, f"{where}: {argv[1]} has no flag {arg.split('=', 1)[0]}"


@pytest.mark.parametrize("page", PAGES)
def test_links_between_pages_resolve(page):
  with open(os.path.join(ROOT, page)) as f:
    text = f.read()
  for target in re.findall(r"\]\(([^)#]+\.md)(?:#[^)]*)?\)", text):
    assert os.path.isfile(os.path.join(ROOT, os.path.dirname(page), target)), f"{page}: broken link {target}"


TOOLS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "tools", "*.py")))


@pytest.mark.parametrize("name", [t for t in TOOLS if t != "aot_compile"])  # aot_compile: absl flags (--helpfull)
def test_tool_help_is_complete(name, capsys):
  """--help prints the tool's whole description (the docstring with its commands), not a first line cut off."""
  tool = load_tool(name)
  with pytest.raises(SystemExit) as done:
    tool.main(["--help"])
  assert done.value.code == 0
  text = capsys.readouterr().out
  assert " ".join(tool.__doc__.split()) in " ".join(text.split()), f"tools/{name}.py --help"


DOCUMENTED_DEFAULTS = [  # (page, text quoting config values as {}, recipe and its argument, the fields quoted)
    ("README.md", "bundled 8x8 digits ({:,} steps", ("digits",), ["num_train_steps"]),
    ("notebooks/quickstart.ipynb", "DDIM-{} at guidance {}", ("digits",),
     ["diffusion.sampling_steps", "diffusion.guidance_scale"]),
    ("notebooks/quickstart.ipynb", "The full `configs/digits.py` run, {:,} steps", ("digits",), ["num_train_steps"]),
    ("docs/evaluation.md", "{} DDPM steps (the official respacing), classifier-free guidance {} on the first 3 "
     "channels (`guidance_mode=\"{}\"`", ("dit_xl",),
     ["diffusion.sampling_steps", "diffusion.guidance_scale", "diffusion.guidance_mode"]),
    ("docs/text_to_image.md", "samples with guidance {:g} from the empty caption", ("digit_scenes",),
     ["diffusion.guidance_scale"]),
    ("docs/text_to_image.md", "with the default {:,} steps at batch {}", ("digit_scenes",),
     ["num_train_steps", "batch_size"]),
    ("docs/text_to_image.md", "Euler, {} steps, guidance {:g}", ("mmdit",),
     ["diffusion.sampling_steps", "diffusion.guidance_scale"]),
    ("docs/text_to_image.md", "no guidance embedding: guidance {:g} from the empty caption", ("digit_scenes", "flux"),
     ["diffusion.guidance_scale"]),
    ("docs/text_to_image.md", "Measured on this 2-core AMD EPYC, with the default {:,} steps at batch {}",
     ("digit_scenes", "flux"), ["num_train_steps", "batch_size"]),
]


@pytest.mark.parametrize("page,text,recipe,fields", DOCUMENTED_DEFAULTS)
def test_documented_defaults_are_the_configs(page, text, recipe, fields):
  """A default the documentation quotes is the config's (one source: a changed default fails here)."""
  config = config_lib.recipe(*recipe)
  values = []
  for field in fields:
    value = config
    for part in field.split("."):
      value = value[part]
    values.append(value)
  with open(os.path.join(ROOT, page)) as f:
    body = f.read().replace('\\"', '"').replace("\\n\",\n    \"", " ")  # notebooks: JSON lines joined
  assert " ".join(text.format(*values).split()) in " ".join(body.split()), f"{page}: {text.format(*values)!r}"
