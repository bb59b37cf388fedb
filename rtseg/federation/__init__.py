"""Federated training of the rtseg model with Flower: local data stays home, only weights travel.

Layout as in Flower's example apps: :mod:`.server_app` (coordinator) and
:mod:`.client_app` (site) are the Flower apps, :mod:`.task` is the site's
nnU-Net work. Only :mod:`.flower` imports ``flwr``.
"""

from __future__ import annotations

from rtseg.errors import FederationError

__all__ = ["FederationError"]  # defined with the other errors; kept importable from here
