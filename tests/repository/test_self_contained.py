"""A clone with nothing beside it passes `make test`: no test, benchmark, job spec or make target reads a
path outside the repository (the sample data lives in tests/data/)."""

import re
from pathlib import Path

from helpers import DATA, REPO

# What reaches out of the repository: its parent folder, a sibling folder, a `..` path.
OUTSIDE = re.compile(r"REPO\.parent|parents\[\d+\]\s*/|\.\./|shared/data|/work/")


def scanned() -> list[Path]:
    files = [REPO / "Makefile", REPO / ".ci" / "run", REPO / "pyproject.toml", REPO / "Dockerfile"]
    for folder, pattern in (("tests", "*.py"), ("bench", "*.py"), ("jobs", "*.yaml"), ("factory", "*.py")):
        files += sorted((REPO / folder).rglob(pattern))
    return [f for f in files if f.resolve() != Path(__file__).resolve()]


def test_nothing_reads_outside_the_repository():
    found = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for path in scanned()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not found, "\n".join(found)


def test_the_sample_data_is_in_the_repository():
    assert DATA.resolve().is_relative_to(REPO.resolve())
    assert sorted(p.name for p in (DATA / "voc_samples").iterdir()) == [
        "114_image.png",
        "114_target.png",
        "1_image.png",
        "1_target.png",
        "23_image.png",
        "23_target.png",
    ]
    assert {p.name for p in (DATA / "ade20k").iterdir()} == {"color150.mat", "object150_info.csv"}
    assert (DATA / "README.md").is_file()
    assert sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file()) < 2**20
