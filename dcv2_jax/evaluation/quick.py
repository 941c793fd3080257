"""The quick evaluation of a trunk: features of the train and eval splits, then weighted kNN and the linear
probe on them (minutes, where the published linear evaluation takes hours). The trainer's end-of-run
evaluation and `python -m dcv2_jax.evaluate` both run this.
"""
from __future__ import annotations

import time

import numpy as np

from dcv2_jax import config as config_lib
from dcv2_jax import sharding as shd
from dcv2_jax.evaluation import protocol as protocols
from dcv2_jax.evaluation.features import extract_split
from dcv2_jax.evaluation.knn import knn_accuracy
from dcv2_jax.evaluation.linear_probe import linear_probe


def knn_and_probe(train_feats, train_labels, test_feats, test_labels, protocol=None,
                  num_classes: int | None = None, linear: bool = True, mesh=None) -> dict:
  """kNN (train features sharded over `mesh` if given) + linear probe (one device) on extracted features.
  Rows with label < 0 (unknown) are dropped."""
  protocol = protocols.fast_protocol() if protocol is None else protocol
  tr, te = np.asarray(train_labels) >= 0, np.asarray(test_labels) >= 0
  train_feats, train_labels = np.asarray(train_feats)[tr], np.asarray(train_labels)[tr]
  test_feats, test_labels = np.asarray(test_feats)[te], np.asarray(test_labels)[te]
  if len(train_labels) == 0 or len(test_labels) == 0:
    return {"skipped": "no labelled rows"}
  if num_classes is None:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  res = dict(num_train=int(len(train_labels)), num_test=int(len(test_labels)),
             feature_dim=int(train_feats.shape[1]), num_classes=int(num_classes), protocol=protocol.name)
  t0 = time.time()
  res["knn_top1"] = knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes,
                                 k=protocol.knn_k, temperature=protocol.knn_temperature, mesh=mesh)
  res["knn_k"] = int(protocol.knn_k)
  res["knn_s"] = time.time() - t0
  if linear:
    t0 = time.time()
    probe = linear_probe(train_feats, train_labels, test_feats, test_labels, num_classes, protocol)
    res.update({"linear_top1": probe["accuracy"], "linear_top5": probe["top5"],
                "linear_train_top1": probe["train_accuracy"], "linear_final_loss": probe["final_loss"],
                "linear_s": time.time() - t0})
  return res


def evaluate_trunk(apply_fn, variables, data_cfg, *, mean, std, protocol=None, mesh=None, batch_size=None,
                   image_size=None, train_split=None, test_split=None, linear: bool = True, batches_fn=None,
                   return_features: bool = False, progress=True, max_samples: int = 0):
  """Features of data_cfg.split (train) and data_cfg.eval_split (test) (max_samples > 0: a fixed subset of that
  many of each), then kNN + probe.

  Returns the results dict (JSON-ready), or (results, dict(train=(f, l, i), test=(f, l, i))) when
  return_features. With no eval split configured, returns {"skipped": ...}.
  """
  protocol = protocols.fast_protocol() if protocol is None else protocol
  train_split = data_cfg.split if train_split is None else train_split
  test_split = data_cfg.get("eval_split", "") if test_split is None else test_split
  if not test_split:
    res = {"skipped": "no eval_split configured"}
    return (res, {}) if return_features else res
  mesh = shd.make_mesh() if mesh is None else mesh
  size, view = config_lib.eval_view(data_cfg)
  kw = dict(batch_size=protocol.extract_batch_size if batch_size is None else batch_size,
            image_size=size if image_size is None else image_size, view=view,
            mesh=mesh, mean=mean, std=std, batches_fn=batches_fn, progress=progress, max_samples=max_samples)
  t0 = time.time()
  train = extract_split(apply_fn, variables, data_cfg, train_split, **kw)
  test = extract_split(apply_fn, variables, data_cfg, test_split, **kw)
  extract_s = time.time() - t0
  res = knn_and_probe(train[0], train[1], test[0], test[1], protocol, linear=linear, mesh=mesh)
  res.update(train_split=train_split, test_split=test_split, extract_s=extract_s, image_size=kw["image_size"],
             view=view)
  return (res, dict(train=train, test=test)) if return_features else res
