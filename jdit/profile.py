"""Where a compiled step spends its time, by op category, from a jax.profiler trace.

XLA names each executed thunk after its HLO instruction; the compiled module's text says what each instruction
is (a fusion's called computation, the jax name stack in op_name, the Python files in its stack frames). Each
instruction goes to the first category that fits:
    optimizer       an instruction traced from optax's files (the parameter update)
    attention       the attention itself (op_name in an "attn"/"attention" scope but not in a sub-layer such as its
                    qkv and output projections, which count as matmuls): scores, softmax, weighted sums
    matmul          a dot or convolution, or a fusion around one (XLA:CPU's oneDNN/YNN fusions)
    copy/transpose  copy, transpose, or a fusion of data movement only (bitcast, broadcast, slice, concatenate...)
    scan            dynamic-slice / dynamic-update-slice of the stacked layers, or a fusion rooted in one
    norm/reduce     another fusion containing a reduce (LayerNorm, softmax, loss and gradient sums)
    elementwise     any other fusion or instruction (modulation, GELU, adds)
Loops and calls (while, conditional, call) are containers: their bodies' thunks are counted instead.
"""
import collections
import dataclasses
import glob
import re
import tempfile
import time

import jax
from jax._src.lib import _profile_data  # the reader of jax.profiler's xplane files

CATEGORIES = ("matmul", "attention", "norm/reduce", "elementwise", "copy/transpose", "scan", "optimizer")
CONTAINERS = {"while", "conditional", "call", "async-start", "async-done"}
MOVEMENT = {"parameter", "constant", "bitcast", "broadcast", "reshape", "slice", "concatenate", "pad", "copy",
            "transpose", "tuple", "get-tuple-element", "iota", "reverse", "convert"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|[\s)}])([a-z][a-z0-9\-]*)\(")
_CALLS = re.compile(r"(?:calls|body|condition|to_apply|branch_computations)=\{?%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_IDENTIFIER = re.compile(r"^[A-Za-z_]\w*$")


@dataclasses.dataclass
class Instruction:
  opcode: str
  op_name: str
  calls: list
  frame: int
  root: bool


def parse_hlo(text: str):
  """(instructions by name, computations: name -> instruction names, frame id -> the file names of its stack)."""
  instructions, computations, current = {}, collections.defaultdict(list), None
  tables, table = collections.defaultdict(dict), None
  for line in text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      table = line
      continue
    if table and line and line[0].isdigit():
      key, _, value = line.partition(" ")
      tables[table][int(key)] = value
      continue
    table = None
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
      continue
    match = _INSTRUCTION.match(line)
    if current is None or not match:
      continue
    name, rest = match.groups()
    opcode = _OPCODE.search(rest)
    op_name, frame = _OP_NAME.search(rest), _FRAME.search(rest)
    instructions[name] = Instruction(opcode.group(1) if opcode else "", op_name.group(1) if op_name else "",
                                     _CALLS.findall(rest), int(frame.group(1)) if frame else 0,
                                     line.lstrip().startswith("ROOT"))
    computations[current].append(name)
  return instructions, computations, _frame_files(tables)


def _frame_files(tables) -> dict:
  """stack frame id -> the file names along its parent chain (HLO text's FileNames/FileLocations/StackFrames)."""
  field = lambda value, key: int(re.search(key + r"=(\d+)", value).group(1))
  files = {}
  for first in tables["StackFrames"]:
    chain, frame, seen = [], first, set()
    while frame in tables["StackFrames"] and frame not in seen:
      seen.add(frame)
      entry = tables["StackFrames"][frame]
      location = tables["FileLocations"].get(field(entry, "file_location_id"), "")
      if location:
        chain.append(tables["FileNames"].get(field(location, "file_name_id"), ""))
      frame = field(entry, "parent_frame_id")
    files[first] = chain
  return files


def _called_opcodes(name: str, instructions, computations, depth: int = 0) -> list:
  """(opcode, is_root) of every instruction in the computations `name` calls, recursively."""
  found = []
  for computation in instructions[name].calls:
    for inner in computations.get(computation, ()):
      found.append((instructions[inner].opcode, instructions[inner].root))
      if depth < 4 and instructions[inner].calls:
        found += _called_opcodes(inner, instructions, computations, depth + 1)
  return found


def _in_attention_core(op_name: str) -> bool:
  """Whether the op is the attention itself (scores, softmax, weighted sum) in an attention module's scope, not
  one of its sub-layers: "blocks/attn/reduce_max" is, "blocks/attn/qkv/btd,dshk->btshk/dot_general" is not."""
  segments = op_name.split("/")
  inside = [i for i, segment in enumerate(segments) if "attn" in segment.lower() or "attention" in segment.lower()]
  if not inside:
    return False
  below = segments[inside[-1] + 1:]
  return not (len(below) > 1 and _IDENTIFIER.match(below[0]))


def categorize(name: str, instructions, computations, frame_files) -> str:
  """The category of instruction `name` (see the module docstring); "" for containers."""
  instruction = instructions[name]
  if instruction.opcode in CONTAINERS:
    return ""
  if any("optax" in f for f in frame_files.get(instruction.frame, ())):
    return "optimizer"
  if _in_attention_core(instruction.op_name):
    return "attention"
  inner = _called_opcodes(name, instructions, computations) if instruction.opcode == "fusion" else []
  opcodes = {instruction.opcode} | {op for op, _ in inner}
  if opcodes & {"dot", "convolution", "custom-call"}:
    return "matmul"
  roots = {op for op, root in inner if root} | ({instruction.opcode} if not inner else set())
  if roots & {"dynamic-slice", "dynamic-update-slice"}:
    return "scan"
  if opcodes <= MOVEMENT | {"fusion"} and (inner or instruction.opcode in {"copy", "transpose"}):
    return "copy/transpose"
  if "reduce" in opcodes or "reduce-window" in opcodes:
    return "norm/reduce"
  return "elementwise"


def _op_of(event, names, kernel_names) -> str:
  """The HLO instruction an event ran: XLA:CPU names its thunk events after it; a GPU kernel carries it in its
  "hlo_op" stat (XLA's "Thunk:#hlo_op=...#" annotation), or, for XLA's own kernels, in its name with "." and
  "-" written "_" (loop_add_fusion_12); "" if none (a library kernel launched outside an annotation)."""
  if event.name in names:
    return event.name
  for key, value in event.stats:
    if key == "hlo_op" and value in names:
      return value
  return kernel_names.get(event.name, "")


def op_durations(spaces, names) -> tuple[collections.Counter, float]:
  """(summed nanoseconds per HLO instruction name, nanoseconds of device events matching none) over profiles
  (`ProfileData`s). Where the trace has device planes (GPUs, TPUs) only their events count (the host's are the
  launches); on CPU the host's threads run the thunks."""
  kernel_names = {name.replace(".", "_").replace("-", "_"): name for name in names}
  planes = [plane for space in spaces for plane in space.planes]
  devices = [plane for plane in planes if plane.name.startswith("/device:")]
  durations, unmatched = collections.Counter(), 0.0
  for plane in devices or planes:
    for line in plane.lines:
      for event in line.events:
        op = _op_of(event, names, kernel_names)
        if op:
          durations[op] += event.duration_ns
        elif devices:
          unmatched += event.duration_ns
  return durations, unmatched


def profile(hlo_text: str, run_once, repeats: int = 3) -> dict:
  """Calls run_once() (one call of the compiled function whose optimized HLO is hlo_text, returning something to
  block on; one warm-up) `repeats` times under the profiler.

  Returns {"wall_ms": per call, "op_ms": per call, summed over instructions (threads may overlap), "unmatched_ms":
  device time per call in kernels naming no instruction (GPUs), "categories":
  {category: {"ms": per call, "share": of op_ms, "ops": instructions seen}}, "top": the 10 slowest instructions}."""
  instructions, computations, frame_files = parse_hlo(hlo_text)
  jax.block_until_ready(run_once())
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      start = time.perf_counter()
      for _ in range(repeats):
        jax.block_until_ready(run_once())
      wall = (time.perf_counter() - start) / repeats
    spaces = [_profile_data.ProfileData.from_file(path)
              for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)]
    durations, unmatched_ns = op_durations(spaces, set(instructions))
  timed = []
  for name, ns in durations.items():
    category = categorize(name, instructions, computations, frame_files)
    if category:
      timed.append((ns / 1e6 / repeats, name, category, instructions[name].op_name))
  return summarize(timed, wall, unmatched_ns / 1e6 / repeats)


def summarize(timed: list, wall_s: float, unmatched_ms: float = 0.0) -> dict:
  """`profile`'s result from (ms per call, op, category, op_name) rows, the wall seconds per call and the
  device time per call in events matching no instruction."""
  per_category = {c: {"ms": 0.0, "share": 0.0, "ops": 0} for c in CATEGORIES}
  for ms, _, category, _ in timed:
    per_category[category]["ms"] += ms
    per_category[category]["ops"] += 1
  total = sum(row["ms"] for row in per_category.values())
  for row in per_category.values():
    row["share"] = round(row["ms"] / total, 4) if total else 0.0
    row["ms"] = round(row["ms"], 3)
  top = [{"op": name, "category": category, "ms": round(ms, 3), "op_name": op_name}
         for ms, name, category, op_name in sorted(timed, reverse=True)[:10]]
  return {"wall_ms": round(wall_s * 1e3, 3), "op_ms": round(total, 3), "unmatched_ms": round(unmatched_ms, 3),
          "categories": per_category, "top": top}


def format_table(result: dict) -> str:
  """A `profile` result as an aligned table: ms per call and share per category, then the slowest ops."""
  lines = [f"{'category':<15} {'ms':>9} {'share':>6} {'ops':>5}"]
  for category, row in sorted(result["categories"].items(), key=lambda item: -item[1]["ms"]):
    lines.append(f"{category:<15} {row['ms']:>9.3f} {100 * row['share']:>5.1f}% {row['ops']:>5}")
  lines.append(f"{'ops (summed)':<15} {result['op_ms']:>9.3f}   wall {result['wall_ms']:.3f} ms per call")
  if result.get("unmatched_ms"):
    lines.append(f"{'not matched':<15} {result['unmatched_ms']:>9.3f}   device time in kernels naming no instruction")
  lines += ["slowest:"] + [f"  {op['ms']:>8.3f} ms  {op['category']:<14} {op['op']}  {op['op_name'][-60:]}"
                           for op in result["top"]]
  return "\n".join(lines)
