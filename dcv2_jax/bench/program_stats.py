"""What a compiled program holds, read from XLA's optimized per-device program: memory, collectives, cuDNN
convolutions, Triton kernels, FLOPs and bytes.

For the GPU compile check (gpu_compile.py), where the program was compiled for GPUs this machine does not have.
XLA gives the memory (`Compiled.memory_analysis`), but no cost analysis on this backend
(`Compiled.cost_analysis()` is None), so its HloCostAnalysis is run over the optimized module here; it counts a
cuDNN convolution (a custom call) as 0 FLOPs, so convolutions are counted from their shapes, and a while loop's
body once (k-means' iterations: one).
"""
from __future__ import annotations

import collections
import re

import jax
import numpy as np

_COLLECTIVES = {"kAllReduce": "all-reduce", "kAllReduceStart": "all-reduce", "kAllGather": "all-gather",
                "kAllGatherStart": "all-gather", "kReduceScatter": "reduce-scatter", "kAllToAll": "all-to-all",
                "kCollectivePermute": "collective-permute", "kCollectivePermuteStart": "collective-permute"}
_CONV_TARGET = re.compile(r'custom_call_target="__cudnn\$conv(\w*)"')
_PALLAS_TARGET = 'custom_call_target="__gpu$xla.gpu.triton"'
_TRITON_FUSION = re.compile(r'"kind":"__triton')
_DIM_LABELS = re.compile(r"dim_labels=(\w+)_(\w+)->(\w+)")
GIB = 2 ** 30


def hlo_modules(compiled) -> list:
  """The optimized per-device HLO modules of a jax `Compiled`. jax has no public accessor for them (its
  as_text() is text that jaxlib's own parser rejects for GPU programs), hence the private attributes."""
  return compiled._executable.xla_executable.hlo_modules()  # pylint: disable=protected-access


def instructions(compiled):
  for module in hlo_modules(compiled):
    for computation in module.computations():
      yield from computation.instructions()


def _leaves(shape) -> list:
  """The array shapes of a (possibly nested tuple) shape."""
  return [leaf for part in shape.tuple_shapes() for leaf in _leaves(part)] if shape.is_tuple() else [shape]


def _nbytes(shape) -> int:
  return int(np.prod(shape.dimensions(), dtype=np.int64)) * np.dtype(shape.numpy_dtype()).itemsize


def memory(compiled) -> dict:
  """Per-device bytes: arguments, outputs, aliased (outputs written into donated arguments), temporaries, and
  their total (what the program needs while it runs)."""
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  return dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes, alias=m.alias_size_in_bytes,
              temp=m.temp_size_in_bytes, total=total)


def collectives(compiled) -> dict:
  """{'all-reduce float32': {'count', 'bytes'}, ...}: the cross-device ops and the bytes each device puts in."""
  out = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
  for ins in instructions(compiled):
    kind = _COLLECTIVES.get(str(ins.opcode).rsplit(".", 1)[-1])
    if kind is None:
      continue
    by_dtype = collections.Counter()
    for operand in ins.operands():
      for shape in _leaves(operand.shape):
        by_dtype[str(np.dtype(shape.numpy_dtype()))] += _nbytes(shape)
    for dtype, nbytes in by_dtype.items():
      out[f"{kind} {dtype}"]["count"] += 1
      out[f"{kind} {dtype}"]["bytes"] += nbytes
  return dict(sorted(out.items()))


def _conv_flops(ins, text: str) -> int:
  """2 x (rows of the forward output) x (filter elements), whichever pass of the convolution the call is: the
  custom call keeps the forward convolution's dim labels (input_filter->output)."""
  kind = _CONV_TARGET.search(text).group(1)
  _, filter_labels, out_labels = _DIM_LABELS.search(text).groups()
  result = _leaves(ins.shape)[0].dimensions()
  operands = [o.shape.dimensions() for o in ins.operands()]
  if kind == "BackwardFilter":
    filt, out = result, operands[1]
  elif kind == "BackwardInput":
    filt, out = operands[1], operands[0]
  else:                                         # Forward, BiasActivationForward
    filt, out = operands[1], result
  out_features = out[out_labels.index("f")]
  assert filt[filter_labels.index("o")] == out_features, text[:200]
  return 2 * int(np.prod(out, dtype=np.int64)) // out_features * int(np.prod(filt, dtype=np.int64))


def read(compiled) -> dict:
  """Everything this module reads from a compiled program, per device: memory (bytes), collectives, cuDNN
  convolutions, Pallas (Triton) kernels, XLA's Triton fusions (its matmuls and some reductions), instructions
  added by rematerialization, FLOPs (XLA's
  HloCostAnalysis of the optimized module plus the convolutions it counts as 0) and bytes accessed."""
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top  (no public entry to HloCostAnalysis)
  convs = conv_flops = pallas = triton_fusions = remat = 0
  for ins in instructions(compiled):
    # XLA's rematerialization (when a program exceeds the card's memory) recomputes values instead of keeping
    # them, and names each copy it adds "<name>.remat".
    remat += ".remat" in ins.name
    op = str(ins.opcode).rsplit(".", 1)[-1]
    if op not in ("kCustomCall", "kFusion"):
      continue
    text = ins.to_string()
    if op == "kCustomCall" and _CONV_TARGET.search(text):
      convs += 1
      conv_flops += _conv_flops(ins, text)
    elif op == "kCustomCall" and _PALLAS_TARGET in text:
      pallas += 1
    elif op == "kFusion" and _TRITON_FUSION.search(text):
      triton_fusions += 1
  client = jax.devices("cpu")[0].client
  analyses = [_jax.hlo_module_cost_analysis(client, module) for module in hlo_modules(compiled)]
  return dict(memory=memory(compiled), collectives=collectives(compiled), cudnn_convolutions=convs,
              pallas_kernels=pallas, triton_fusions=triton_fusions, rematerialized=remat,
              flops=conv_flops + sum(a.get("flops", 0.0) for a in analyses),
              bytes_accessed=sum(a.get("bytes accessed", 0.0) for a in analyses))
