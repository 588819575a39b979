"""What the benchmarks share: the device's peak FLOP/s (a table for accelerators, a measured matmul on CPUs), a
median timer, and printing a result row."""
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jdit import profile

PEAK_BF16_FLOPS = {  # dense bf16 peak per chip / GPU
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "A100": 312e12, "H100": 989e12, "H200": 989e12,
}


PEAK_HBM_BYTES_PER_S = {  # memory bandwidth per chip / GPU
    "TPU v4": 1.228e12, "TPU v5 lite": 0.819e12, "TPU v5e": 0.819e12, "TPU v5p": 2.765e12, "TPU v5": 2.765e12,
    "TPU v6 lite": 1.64e12, "TPU v6e": 1.64e12, "A100": 2.039e12, "H100": 3.35e12, "H200": 4.8e12,
}


def table_peaks(kind: str) -> tuple[float, float] | None:
  """(bf16 peak FLOP/s, HBM bytes/s) of an accelerator by device_kind, from the tables; None for others."""
  for name, peak in PEAK_BF16_FLOPS.items():
    if name.lower() in kind.lower():
      return peak, PEAK_HBM_BYTES_PER_S[name]
  return None


def device_peak_flops(dtype: str = "float32") -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from); on CPU a matmul in `dtype` accumulating in
  float32, the way the model's matmuls run (bf16 GEMMs run about twice as fast on CPUs with AVX512-BF16)."""
  kind = jax.devices()[0].device_kind
  if (peaks := table_peaks(kind)) is not None:
    return peaks[0], f"{kind} bf16 peak (table)"
  n = 2048
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
  return 2 * n ** 3 / timed(matmul, a, repeats=5), f"{kind} {dtype} matmul probe (measured)"


BUSY_LOAD_PER_CORE = 0.5  # a 1-minute load average above this per core: other work shares the cores


def machine() -> dict:
  """The host's CPU model, core count and 1-minute load average: ratios against PyTorch move with the CPU (AMX
  or not) and invert under load (PyTorch's threads degrade first), so every benchmark row records them."""
  model = ""
  if os.path.isfile("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
  return {"cpu_model": model or platform.processor(), "cpu_cores": os.cpu_count(),
          "load_average_1m": round(os.getloadavg()[0], 2)}


def busy_warning(host: dict) -> str | None:
  """A warning when the host was busy (load average above BUSY_LOAD_PER_CORE per core), else None."""
  if host["load_average_1m"] > BUSY_LOAD_PER_CORE * host["cpu_cores"]:
    return (f"warning: load average {host['load_average_1m']} on {host['cpu_cores']} cores: the machine is busy, "
            "so these timings (and any ratio to PyTorch) are not comparable; rerun on a quiet machine")
  return None


def timed(fn, *args, repeats: int, wait=jax.block_until_ready) -> float:
  """Median seconds of fn(*args) after one warm-up call; `wait(result)` blocks until the work is done."""
  wait(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    wait(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def print_row(row: dict, as_json: bool) -> None:
  """The benchmark's figures as JSON or as an aligned table."""
  if as_json:
    print(json.dumps(row, indent=1))
    return
  scalars = {k: v for k, v in row.items() if not k.endswith("train_step_profile")}
  width = max(map(len, scalars))
  print("\n".join(f"{k:>{width}}: {v}" for k, v in scalars.items()))
  for key, who in (("train_step_profile", "jdit"), ("torch_train_step_profile", "PyTorch")):
    if key in row:
      print(f"\n{who} train step by op category:\n" + profile.format_table(row[key]))
