"""Evaluation of frozen trunk features (after training, or of any torchvision/SwAV/VISSL weights).

  protocol.py          the protocols, defined once (published linear eval; quick probe; kNN settings)
  features.py          pooled features of a dataset split
  knn.py               weighted kNN
  linear_probe.py      the quick probe: a Linear layer on pre-extracted features
  quick.py             features + kNN + probe: the trainer's end-of-run eval and `python -m dcv2_jax.evaluate`
  linear_on_crops.py   the published linear evaluation on augmented crops (`python -m dcv2_jax.linear_eval`)
  cluster_quality.py   NMI/ARI/purity of a run's saved assignments against the labels
"""
from dcv2_jax.evaluation.cluster_quality import assignment_quality
from dcv2_jax.evaluation.features import extract_features, extract_split
from dcv2_jax.evaluation.knn import knn_accuracy, knn_classify
from dcv2_jax.evaluation.linear_on_crops import train_linear
from dcv2_jax.evaluation.linear_probe import linear_probe, top_k_accuracy
from dcv2_jax.evaluation.protocol import (PROTOCOLS, fast_protocol, get_protocol, linear_protocol, lr_at_epoch,
                                          protocol_for)
from dcv2_jax.evaluation.quick import evaluate_trunk, knn_and_probe

__all__ = ["assignment_quality", "extract_features", "extract_split", "knn_accuracy", "knn_classify", "train_linear",
           "linear_probe", "top_k_accuracy", "PROTOCOLS", "fast_protocol", "get_protocol",
           "linear_protocol", "lr_at_epoch", "protocol_for", "evaluate_trunk", "knn_and_probe"]
