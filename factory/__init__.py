"""factory: a distributed batch data factory for image segmentation training data, on Ray."""

__version__ = "0.1.0"
