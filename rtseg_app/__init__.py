"""The composition root: the ``rtseg`` command line, ``rtseg serve`` and ``rtseg bench``.

It imports the core (``rtseg/``) and both faces (``dicom_node/``, ``service/``);
nothing imports it.
"""
