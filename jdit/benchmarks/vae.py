"""The VAE decode benchmark (tools/bench_vae.py): one decode of a random latent with an untrained VAE, tiled
(jdit.models.tiling) or not, with its memory. `options`: vae (a VAE config name, or "small"), resolution, tile,
dtype."""
import resource

import jax
import jax.numpy as jnp
import numpy as np

from jdit.benchmarks.common import timed
from jdit.models import tiling
from jdit.models import vae as vae_lib

SMALL_VAE = dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=8)


def bench_vae_decode(options) -> dict:
  """Seconds (after a warm-up call) and memory of one decode of (1, resolution/8, resolution/8, C) latents."""
  vae = vae_lib.AutoencoderKL(**(SMALL_VAE if options.vae == "small" else vae_lib.VAE_CONFIGS[options.vae]),
                              dtype=options.dtype)
  params = vae.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  size = options.resolution // vae.downsample_factor
  latents = np.random.RandomState(0).randn(1, size, size, vae.latent_channels).astype(np.float32)
  row = {"vae": options.vae, "resolution": options.resolution, "tile": options.tile}
  if options.tile:
    decode = lambda z: tiling.decode_tiled(vae, params, z, options.tile)  # noqa: E731
  else:
    decode = jax.jit(lambda z: vae.apply({"params": params}, z, method=vae.decode)).lower(latents).compile()
    row["xla_temp_gib"] = round(decode.memory_analysis().temp_size_in_bytes / 2 ** 30, 3)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes on Linux
  row["decode_s"] = round(timed(decode, latents, repeats=1), 3)
  row["process_growth_gib"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 2 ** 30, 3)
  peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  if peak:
    row["device_peak_gib"] = round(peak / 2 ** 30, 3)
  return row
