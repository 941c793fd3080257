"""DCv2 on CIFAR-100: the CIFAR-10 recipe (configs/cifar10.py: solo-learn's DCv2 setup, ResNet-18 CIFAR stem,
3 x 3000 clusters, batch 256, 1000 epochs) on CIFAR-100. Published linear top-1 63.61 (solo-learn's README).

  python train.py --config=configs/cifar100.py --workdir=/runs/dcv2_cifar100 --config.data.path=/data/cifar100
  python train.py --config=configs/cifar100.py:200 ...      # or :100 epochs

Expected: linear top-1 about 63-64% after 1000 epochs (solo-learn; not yet run with this code).
"""
from configs import cifar10


def get_config(epochs: str = "1000"):
  c = cifar10.get_config(epochs)
  c.data.name = "cifar100"
  c.augment.mean = (0.5071, 0.4865, 0.4409)       # CIFAR-100's statistics, as solo-learn normalises
  c.augment.std = (0.2673, 0.2564, 0.2762)
  return c
