"""DCv2, ResNet-50, 2x224 crops, 400 epochs: the published recipe (ImageNet linear top-1 70.2 SwAV repo /
70.01 VISSL zoo, batch 4096 on 64 V100s).

  python train.py --config=configs/dcv2_2crops.py --workdir=/runs/dcv2_2crops \
      --config.data.path=/data/tensorflow_datasets        # tfds data_dir holding imagenet2012 (ArrayRecord)

Hardware: written for 64 GPUs (8 nodes x 8) at 64 per GPU; the same command runs on fewer: the global batch
stays 4096 and BatchNorm keeps groups of 512 samples (model.sync_bn.samples) whatever the GPU count. With
--config.per_device_batch_size the global batch changes and the LR follows the linear rule (4.8 at 4096,
i.e. 0.3 per 256) unless --config.optim.scale_lr_with_batch=False.
Precision: bfloat16 compute (the project default); the published SwAV-repo run was float32
(--config.model.dtype=float32), VISSL's was AMP O1.
Expected: ImageNet linear-eval top-1 about 70% (python -m dcv2_jax.linear_eval --workdir ...; the quick
python -m dcv2_jax.evaluate --workdir ... --protocol imagenet probe reads a little lower).
"""
from dcv2_jax.config import base_config


def get_config():
  c = base_config()
  c.batch_size = 4096
  c.num_epochs = 400
  c.data.source = "tfds"
  c.data.name = "imagenet2012"
  c.data.split = "train"
  c.data.eval_split = "validation"
  c.data.crops = ((224, 2, 0.08, 1.0),)
  c.loss.crops_for_mb = (0, 1)
  # Published: SyncBN in groups of 8 GPUs x 64 samples. As samples, the same statistics on any GPU count
  # (one group per GPU at 512 per GPU, 8 groups on one GPU holding the whole batch).
  c.model.sync_bn.samples = 512
  return c
