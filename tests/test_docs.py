"""The repository carries its own design: every docs/… citation resolves inside it."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".cpp", ".h", ".cu", ".txt", ".toml"}


def _files():
    for folder in ("saint_export", "plugins", "tests", "scripts", "docs", "engines", "."):
        pattern = "*" if folder == "." else "**/*"
        yield from (p for p in (ROOT / folder).glob(pattern) if p.is_file() and p.suffix in SUFFIXES)


def test_every_docs_citation_resolves():
    cited = {}
    for path in _files():
        for name in re.findall(r"docs/([\w-]+\.md)", path.read_text(errors="replace")):
            cited.setdefault(name, path.relative_to(ROOT))
    assert {"method.md", "operator.md", "parity.md", "keep-schedules.md", "artifacts.md"} <= set(cited)
    missing = {name: str(where) for name, where in cited.items() if not (ROOT / "docs" / name).is_file()}
    assert missing == {}


def test_no_citation_of_a_design_outside_the_repository():
    offenders = [str(p.relative_to(ROOT)) for p in _files() if "DESIGN §" in p.read_text(errors="replace")
                 and p.name != "test_docs.py"]
    assert offenders == []
