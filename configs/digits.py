"""The embedded demo: DCv2 on scikit-learn's digits (bundled, no download), CPU-sized.

  python train.py --config=configs/digits.py --workdir=/tmp/dcv2_digits

Hardware: 2 CPU cores, about 4 minutes. 1,438 training images (8x8 upscaled to 32x32), ResNet-18 at a
quarter width, 2x32 crops, 3 heads x 40 clusters, 60 epochs. At the end it prints the kNN accuracy
(held-out 20%) of the learned features next to the same network at random initialisation; the NMI of the
cluster assignments against the digit labels is logged every epoch, a kNN curve every 10 epochs, and
8 clusters' nearest digits to <workdir>/clusters/epoch_XXXX.png.
Expected (a 2-core CPU VM, 2026-12-01: ~900 img/s, 3.5 min of training alone on the machine): kNN top-1 0.94
learned vs 0.84 random init, linear probe 0.99 vs 0.86. The run is chaotic at this LR: seeds 0-6 give kNN
0.939 / 0.950 / 0.986 / 0.950 / 0.925 / 0.981 / 0.981 (mean 0.959; `--config.seed=N`), and a change that only
moves float rounding moves a seed by up to 3 points; compare code changes over several seeds, not one run.
"""
from dcv2_jax.config import base_config


def get_config():
  c = base_config()
  c.seed = 0
  c.batch_size = 64
  c.num_epochs = 60
  c.data.source = "digits"
  c.data.split = "train"
  c.data.eval_split = "validation"
  # Evaluate on the centre crop, not the whole digit: the training crops zoom in (scale 0.5-1), and the
  # learned features read the centre crop better (kNN 0.939 vs 0.930 at seed 0; +0 to +0.9 points over seeds 0-2).
  c.data.eval_resize = "center_crop"
  c.data.image_size_digits = 32
  c.data.crops = ((32, 2, 0.5, 1.0),)
  c.data.num_workers = 0
  c.augment.blur_p = 0.0          # 32px digits: blur only erases them
  c.augment.flip_p = 0.0          # a mirrored digit is another symbol (flips cost 0.35 kNN accuracy here)
  c.augment.jitter_p = 0.5
  c.model.depth = 18
  c.model.base_width = 16
  c.model.head_dims = (256, 64)
  c.model.dtype = "float32"       # CPU: bfloat16 is emulated and slower
  c.loss.num_clusters = (40, 40, 40)
  c.loss.temperature = 0.1
  c.optim.lr = 4.8                # the published LR, unscaled (LARC makes the step relative to |w|)
  c.optim.lr_reference_batch = 64
  c.optim.warmup_epochs = 1
  c.optim.weight_decay = 1e-5
  c.log_every_steps = 22
  c.checkpoint_every_steps = 100
  c.eval_at_end = True
  c.eval_random_init = True
  c.eval_every_epochs = 10        # a kNN curve in metrics.jsonl / TensorBoard while it trains
  c.eval_max_samples = 0          # all of both splits: the digits are small
  c.log_cluster_images = 8        # clusters/epoch_XXXX.png: 8 clusters x the 8 digits nearest their centroids
  return c
