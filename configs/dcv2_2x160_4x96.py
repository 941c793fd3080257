"""DCv2, ResNet-50, multi-crop 2x160 + 4x96, 400 epochs (published top-1 74.3 SwAV repo / 74.32 VISSL).

  python train.py --config=configs/dcv2_2x160_4x96.py --workdir=/runs/dcv2_mc400 \
      --config.data.path=/data/tensorflow_datasets

Hardware: 64 GPUs x 64 per GPU as published (one epoch took 3 min 13 s on 64 V100s); see
configs/dcv2_2crops.py for fewer GPUs. Expected: ImageNet linear-eval top-1 about 74%.
"""
from configs import dcv2_2crops


def get_config():
  c = dcv2_2crops.get_config()
  c.data.crops = ((160, 2, 0.08, 1.0), (96, 4, 0.05, 0.14))
  return c
