"""The repository stands on its own: what the code, tests, benchmarks and notebooks cite lives in docs/, and every
cited docs page and section exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("dsv3", "tests", "bench", "notebooks", "scripts") for p in (ROOT / d).rglob("*")
           if p.suffix in (".py", ".ipynb", ".sh", ".md") and "__pycache__" not in p.parts]
CITATION = re.compile(r"docs/([\w-]+\.md)((?:,?\s*§\s*[\w.]+)*)")


def _headings(page: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in page.read_text().splitlines() if line.startswith("#")]


def _has_section(headings: list[str], section: str) -> bool:
    """A heading starts with "§<section>" (architecture.md §3) or "<section>." (performance.md §B6 -> "B6.")."""
    return any(h.startswith((f"§{section} ", f"{section}. ", f"{section} ")) or h == f"§{section}" for h in headings)


def test_nothing_cites_a_path_outside_the_repository():
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES if p.name != "test_docs.py"
                 for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
                 if "shared/reference" in line or "reference sheet" in line]
    assert not offenders, offenders


def test_cited_docs_pages_and_sections_exist():
    missing, cited = [], 0
    for source in SOURCES:
        for page, sections in CITATION.findall(source.read_text(errors="replace")):
            path, cited = ROOT / "docs" / page, cited + 1
            if not path.exists():
                missing.append(f"{source.relative_to(ROOT)}: docs/{page}")
                continue
            for section in re.findall(r"§\s*([\w.]+)", sections):
                if not _has_section(_headings(path), section.rstrip(".")):
                    missing.append(f"{source.relative_to(ROOT)}: docs/{page} §{section}")
    assert cited and not missing, missing
