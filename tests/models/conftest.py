import fsspec
import pytest


@pytest.fixture
def memfs():
    """fsspec's in-memory filesystem, emptied of the tests' `/models` after each test."""
    fs = fsspec.filesystem("memory")
    yield fs
    if fs.exists("/models"):
        fs.rm("/models", recursive=True)
