"""Diffusion objectives and samplers: Gaussian (official DiT), rectified flow, classifier-free guidance."""
