"""Few-shot data sets: Omniglot, and the image loader its preprocessing uses."""

from pymeta.datasets.omniglot import Omniglot, load_image

__all__ = ["Omniglot", "load_image"]
