"""DCv2 on ImageNet-100 (the 100-class subset of CMC / solo-learn): ResNet-18 (ImageNet stem), 2x224 crops,
3 x 3000 clusters, batch 256, 400 epochs: solo-learn's DCv2 setup. Published linear top-1 75.40 (offline
linear evaluation; 75.36 online; solo-learn's README).

  python train.py --config=configs/imagenet100.py --workdir=/runs/dcv2_in100 --config.data.path=/data/imagenet100
  python train.py --config=configs/imagenet100.py:200 ...      # or :100 epochs

Data: an image folder <path>/train/<class>/*.JPEG and <path>/val/<class>/*.JPEG with solo-learn's 100 classes
(their list: solo-learn's data preparation); nothing downloads.
Hardware: one to eight GPUs (solo-learn: 2 x 128). Expected: linear top-1 about 75% (python -m dcv2_jax.linear_eval;
not yet run with this code). Evaluation: the published ImageNet protocol (Resize 256, centre crop 224).
Optimizer and precision: as configs/cifar10.py says (solo-learn's LARS = our LARC with eta 0.02, clipping and
biases / BN left out; bfloat16 instead of float16).
"""
from configs import cifar10


def get_config(epochs: str = "400"):
  c = cifar10.get_config(epochs)
  c.data.name = "imagenet100"
  c.data.split, c.data.eval_split = "train", "val"
  c.data.crops = ((224, 2, 0.08, 1.0),)
  c.model.stem = "imagenet"
  c.augment.mean = (0.485, 0.456, 0.406)          # ImageNet's, as solo-learn (and the SwAV repo's std)
  c.augment.std = (0.228, 0.224, 0.225)
  c.eval_every_epochs = 20
  c.eval_max_samples = 5000
  return c
