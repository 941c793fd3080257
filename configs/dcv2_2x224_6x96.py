"""DCv2, ResNet-50, multi-crop 2x224 + 6x96, 800 epochs: the best published DCv2 (top-1 75.2 SwAV repo /
75.18 VISSL zoo).

  python train.py --config=configs/dcv2_2x224_6x96.py --workdir=/runs/dcv2_mc800 \
      --config.data.path=/data/tensorflow_datasets

Hardware: 64 GPUs x 64 per GPU as published; see configs/dcv2_2crops.py for fewer GPUs.
Expected: ImageNet linear-eval top-1 about 75%.
"""
from configs import dcv2_2crops


def get_config():
  c = dcv2_2crops.get_config()
  c.num_epochs = 800
  c.data.crops = ((224, 2, 0.14, 1.0), (96, 6, 0.05, 0.14))
  return c
