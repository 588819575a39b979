"""Model families (the DiT, the ADM U-Net, the SD3 MM-DiT; one module each) behind one interface
(jdit.models.family), the conditioning contract, the VAE and its tiling.

Library code goes through `family`; these names are for users who want the DiT directly.
"""
from jdit.models.dit import DiT, PAPER_VARIANTS, VARIANTS, create_dit

__all__ = ["DiT", "PAPER_VARIANTS", "VARIANTS", "create_dit"]
