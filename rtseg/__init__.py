"""rtseg: organ-at-risk segmentation for radiotherapy planning (core library)."""

__version__ = "0.1.0"
