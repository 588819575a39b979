"""Evaluation in JAX: ADM's Inception-v3 features (FID, sFID, IS, precision/recall) and CLIP metrics.

    inception  the 2015-12-05 TF graph's Inception-v3 in flax.linen
    features   ADM's pipeline (TF1 bilinear resize to 299, (x - 128) / 128) and the pytorch-fid weight loader
    metrics    float64 statistics, the Frechet distance, Inception Score, improved precision/recall
    batches    ADM evaluator .npz batches, streamed; reference batches written in that format
    evaluate   activations of a batch file and ADM's five numbers
    monitor    the FID during training and the evaluation at the end of --mode=fid_samples (config.eval)
    clip       the CLIP image tower, CLIP score and directional similarity
    dinov2     DINOv2 (transformers' Dinov2Model, with registers too): REPA's encoder and FD_DINOv2's features
    stability  prediction stability across timesteps: the validation pass's numbers (jdit.validation)
Imports run one way: inception <- features <- evaluate <- monitor; metrics, batches <- evaluate.
"""
from jdit.eval.dinov2 import load_dinov2
from jdit.eval.features import inception_features, load_inception
from jdit.eval.stability import prediction_stability

__all__ = ["inception_features", "load_dinov2", "load_inception", "prediction_stability"]
