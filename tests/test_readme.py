"""README.md documents every table and column exactly as the schemas define them."""

from pathlib import Path

from schemas import catalog, particles

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_readme_documents_the_particle_table():
    assert particles.markdown() in README


def test_readme_documents_the_catalog():
    assert catalog.markdown() in README
