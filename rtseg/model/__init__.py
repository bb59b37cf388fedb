"""Models: nnU-Net v2 used as a library behind a small :class:`~rtseg.model.segmenter.Segmenter` protocol.

* :mod:`rtseg.model.manifest` -- what a model folder is (``rtseg-model.json`` or derived).
* :mod:`rtseg.model.dataset` -- canonical volumes → nnU-Net raw dataset.
* :mod:`rtseg.model.cpu` -- the CPU-sized configuration and the nnU-Net plans for it.
* :mod:`rtseg.model.training` -- plan/preprocess/train/export, each in a child process
  (:mod:`rtseg.model.children` runs it; :mod:`rtseg.model._run` is the child).
* :mod:`rtseg.model.rounds` -- the steps of a federated round; :mod:`rtseg.model.weights` -- weights
  as plain arrays.
* :mod:`rtseg.model.segmenter` -- load a model folder once, segment CT volumes.

Importing this package does not import torch or nnU-Net.
"""
