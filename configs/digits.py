"""The embedded demo: DCv2 on scikit-learn's digits (bundled, no download), CPU-sized.

  python train.py --config=configs/digits.py --workdir=/tmp/dcv2_digits

Hardware: 2 CPU cores, a few minutes. 1,438 training images (8x8 upscaled to 32x32), ResNet-18 at a
quarter width, 2x32 + 2x16 crops, 3 heads x 40 clusters. At the end it prints the kNN accuracy
(held-out 20%) of the learned features next to the same network at random initialisation, and the
NMI of the cluster assignments against the digit labels is logged every epoch.
"""
from dcv2_jax.config import base_config


def get_config():
  c = base_config()
  c.seed = 0
  c.batch_size = 64
  c.num_epochs = 12
  c.data.source = "digits"
  c.data.split = "train"
  c.data.eval_split = "validation"
  c.data.image_size_digits = 32
  c.data.crops = ((32, 2, 0.4, 1.0), (16, 2, 0.2, 0.5))
  c.data.num_workers = 0
  c.augment.blur_p = 0.0          # 32px digits: blur only erases them
  c.augment.jitter_p = 0.5
  c.model.depth = 18
  c.model.base_width = 16
  c.model.head_dims = (256, 64)
  c.model.dtype = "float32"       # CPU: bfloat16 is emulated and slower
  c.loss.num_clusters = (40, 40, 40)
  c.loss.temperature = 0.1
  c.optim.lr = 0.3                # no LR scaling: the reference batch is this batch
  c.optim.warmup_start_lr = 0.03
  c.optim.final_lr = 0.003
  c.optim.lr_reference_batch = 64
  c.optim.warmup_epochs = 1
  c.optim.weight_decay = 1e-5
  c.log_every_steps = 11
  c.checkpoint_every_steps = 100
  c.eval_at_end = True
  c.eval_random_init = True
  return c
