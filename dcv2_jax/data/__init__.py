"""Input data for DCv2: sources (tfds ArrayRecord, image folders, scikit-learn digits), the grain multi-crop
training pipeline, evaluation batches and device prefetch. See docs/data.md.

    pipeline = Pipeline(config)                 # this process's share of every global batch
    for batch in device_prefetch(pipeline.iterate(epoch), mesh):
      ...                                       # batch['crops'][g]: [global_batch, count_g, S_g, S_g, 3] uint8,
                                                # or (data.crops_on=device) batch['image'], ['image_size'], ['boxes']

jax is imported lazily here: the grain worker processes unpickle these modules and need only numpy/PIL.
"""
from dcv2_jax.data.pipeline import EpochIterator, Pipeline, crop_groups, eval_batches
from dcv2_jax.data.prefetch import DevicePrefetcher, device_prefetch
from dcv2_jax.data.sources import SOURCES, decode_image, make_source

__all__ = ["Pipeline", "EpochIterator", "eval_batches", "crop_groups", "device_prefetch", "DevicePrefetcher",
           "make_source", "decode_image", "SOURCES"]
