"""Models: nnU-Net v2 used as a library behind a small :class:`~rtseg.model.segmenter.Segmenter` protocol.

* :mod:`rtseg.model.manifest` -- what a model folder is (``rtseg-model.json`` or derived).
* :mod:`rtseg.model.dataset` -- canonical volumes → nnU-Net raw dataset.
* :mod:`rtseg.model.training` -- CPU-sized plan/preprocess/train/export, each in a child process.
* :mod:`rtseg.model.segmenter` -- load a model folder once, segment CT volumes.

Importing this package does not import torch or nnU-Net.
"""
