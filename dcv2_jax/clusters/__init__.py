"""What the clusters look like, every epoch and after training.

  metrics.py      NMI / ARI / purity against labels, cluster sizes and health, in plain numpy
  assignments.py  the per-epoch assignment tables on disk (<workdir>/assignments/epoch_XXXX.npz)
  pictures.py     a few clusters x their members, as one picture
  report.py       the trainer's report after each epoch's k-means: health, warnings, tables, pictures
"""
