"""Shared test setup: an 8-device fake CPU mesh, cheap compilation, and helpers to make non-trivial parameters."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most tests run tiny programs a few times, where XLA's optimization passes cost more than they save (as flax's
# example tests do); subprocesses inherit it. Long runs set JAX_DISABLE_MOST_OPTIMIZATIONS=0 for themselves.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# One XLA compilation cache per test run, shared by the xdist workers and the subprocesses they start (the
# controller sets it before the workers exist; they inherit it): many tests compile the same tiny programs
# (train_test.py: 77 s without, 55 s with it). Its size limit turns on the cache's file lock, so concurrent
# processes never read a half-written entry. Removed when the run ends.
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  os.environ.update(JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(prefix="jdit_test_xla_cache_"),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1",
                    JAX_COMPILATION_CACHE_MAX_SIZE=str(8 * 2 ** 30), JDIT_TEST_CACHE_OWNER=str(os.getpid()))

import importlib.util  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402


def pytest_sessionfinish(session):
  """The run's compilation cache goes with the process that made it."""
  if os.environ.get("JDIT_TEST_CACHE_OWNER") == str(os.getpid()):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def randomize(params, seed: int = 0, scale: float = 0.1):
  """Replaces every parameter by N(0, scale^2) noise, so zero-initialized paths are exercised too."""
  params = nn.unbox(params)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, leaf.shape, leaf.dtype)
                                      for k, leaf in zip(keys, leaves)])


def free_port() -> int:
  """A TCP port free on localhost now (the coordinator of a multi-process test)."""
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def relative_error(actual, reference) -> float:
  """max |actual - reference| / max |reference|: error relative to the output's scale."""
  actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
  return float(np.abs(actual - reference).max() / np.abs(reference).max())


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_file(path: str, name: str):
  """The Python file at `path` as a module: configs and tools are files, not a package."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(name: str, *args):
  """configs/<name>.get_config(*args), loaded by path as the CLI does."""
  from jdit import config
  return config.from_file(os.path.join(ROOT, "configs", name), *args)


def load_tool(name: str):
  """tools/<name>.py as a module (its main(argv) runs the CLI in this process)."""
  return load_file(os.path.join(ROOT, "tools", f"{name}.py"), f"tool_{name}")


@pytest.fixture(scope="module")
def optimized():
  """XLA's full optimizations for a module of long-running programs (the rest of the suite turns most off)."""
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "1")
