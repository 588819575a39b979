"""Model families (DiT, the ADM U-Net) behind one interface (jdit.models.family), their layers, and the VAE.

Library code goes through `family`; these names are for users who want one family directly.
"""
from jdit.models.dit import DiT, PAPER_VARIANTS, VARIANTS, create_dit

__all__ = ["DiT", "PAPER_VARIANTS", "VARIANTS", "create_dit"]
