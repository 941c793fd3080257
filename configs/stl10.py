"""DCv2 on STL-10 at 96 px: the CIFAR recipe's settings (configs/cifar10.py) on STL-10's 100,000 unlabelled
+ 5,000 labelled training images, ResNet-18 with the ImageNet stem (96 px images keep the 7x7/2 + max-pool
stem, as solo-learn does for everything but CIFAR), 2x96 crops.

  python train.py --config=configs/stl10.py --workdir=/runs/dcv2_stl10 --config.data.path=/data/stl10
  python train.py --config=configs/stl10.py:200 ...      # or :100 epochs

Data: an image folder <path>/train/<class>/ (STL-10's 5,000 labelled training images) and <path>/test/<class>/,
or tfds stl10 (ArrayRecord). To cluster the 100,000 unlabelled images too, make a split folder holding the
labelled classes plus one more sub-folder of them (--config.data.split=train_unlabeled); evaluate the result
against the labelled ones with python -m dcv2_jax.evaluate --workdir W --data.split=train.
Expected: no DCv2 result on STL-10 is published (solo-learn, SwAV and VISSL have none): the run's kNN curve and
final linear evaluation are the first numbers. Evaluation at 96 px, the whole image.
"""
from configs import cifar10


def get_config(epochs: str = "1000"):
  c = cifar10.get_config(epochs)
  c.data.name = "stl10"
  c.data.crops = ((96, 2, 0.08, 1.0),)
  c.model.stem = "imagenet"
  c.augment.mean = (0.4914, 0.4823, 0.4466)       # solo-learn's STL-10 statistics
  c.augment.std = (0.247, 0.243, 0.261)
  return c
