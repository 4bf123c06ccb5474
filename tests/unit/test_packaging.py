"""The product ships without its test equipment: no sandbox in the package or the production image."""

import tomllib

from setuptools import find_packages

from tests.conftest import ROOT


def test_the_production_package_holds_no_sandbox():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(ROOT), include=config["include"])
    assert packages and not [p for p in packages if p.startswith("sandboxes") or p.startswith("tests")]
    assert not [p for p in (ROOT / "adapters").rglob("*sandbox*.py")]


def test_the_production_image_copies_no_sandbox():
    stages = (ROOT / "Dockerfile").read_text().split("FROM ")
    production = next(s for s in stages if s.startswith("base AS production"))
    base = next(s for s in stages if " AS base" in s.splitlines()[0])
    assert "sandboxes" not in production and "sandboxes" not in base
