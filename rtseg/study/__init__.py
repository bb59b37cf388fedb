"""The two-center study on the phantom cohort (``rtseg evaluate``).

Five models trained with the same budget — one local model per center (C, D), federated C+D
(real Flower processes), centralised (pooled data) and the ensemble of the
two local models — scored on held-out cases of both centers, in-center and
cross-center, for orientation robustness and for false-positive kidneys after
nephrectomy. :mod:`.design` holds the settings, :mod:`.data` the cohorts,
:mod:`.arms` the training, :mod:`.scoring` the inference and metrics,
:mod:`.findings` the pure summary and conclusion, :mod:`.report` the files.
"""
