"""factory: a distributed batch data factory for image segmentation training data, on Ray."""

from importlib import metadata

# pyproject.toml is the one place the version is written; a source tree that was never installed has none.
try:
    __version__ = metadata.version("factory")
except metadata.PackageNotFoundError:
    __version__ = "0+unknown"
