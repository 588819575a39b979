"""Evaluation in JAX: ADM's Inception-v3 features (FID, sFID, IS, precision/recall).

    inception  the 2015-12-05 TF graph's Inception-v3 in flax.linen
    features   ADM's pipeline (TF1 bilinear resize to 299, (x - 128) / 128) and the pytorch-fid weight loader
Imports run one way: inception <- features.
"""
from jdit.eval.features import inception_features, load_inception

__all__ = ["inception_features", "load_inception"]
