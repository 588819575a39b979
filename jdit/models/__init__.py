"""DiT models, their layers and positional encodings."""
from jdit.models.dit import DiT, PAPER_VARIANTS, VARIANTS, create_dit, dit_from_config, model_config

__all__ = ["DiT", "PAPER_VARIANTS", "VARIANTS", "create_dit", "dit_from_config", "model_config"]
