"""CellFuse: cell segmentation without structural reporters, served over REST."""

__version__ = "0.1.0"
