"""The platform a program is traced for, which picks platform-specific layers (matmul dtypes, attention kernels).

    platform.target()                      # JAX's default backend: "cpu", "gpu" or "tpu"
    with platform.targeting("tpu"): ...    # tracing for devices this host does not have (jdit.aot)
An ahead-of-time compile for a TPU topology runs on a CPU host, whose default backend is "cpu": without
`targeting`, the program it compiles would hold the CPU's choices (float32 activations, CPU attention), not
the one a TPU runs.
"""
import contextlib
import contextvars

import jax

_TARGET = contextvars.ContextVar("jdit_target_platform", default=None)


def target() -> str:
  """The platform being traced for: the innermost `targeting`, else JAX's default backend."""
  return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def targeting(name: str):
  """Traces inside this block are for platform `name` ("cpu", "gpu", "tpu")."""
  token = _TARGET.set(name)
  try:
    yield
  finally:
    _TARGET.reset(token)
