"""The network DCv2 trains.

  trunk.py         the ResNet / ResNeXt trunk (torchvision-exact) and TrunkArch, the one description of it
  head.py          the projection head
  multi_crop.py    DCv2Model: crop groups -> trunk -> head -> unit embeddings; dcv2_model(config)
  batchnorm.py     BatchNorm with SyncBN groups
  weight_grads.py  convolutions and dense layers whose weight gradients are summed over the devices in float32
"""
