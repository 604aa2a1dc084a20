"""Every relative link in README.md and docs/ points to a file of the repository, and every
anchor to a heading of the file it names (GitHub's heading slugs)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def prose(path: Path) -> str:
    """The page without its code blocks and code spans (links there are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", path.read_text()))


def slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            base = slug(match.group(1))
            name, count = base, 1
            while name in found:  # GitHub numbers repeated headings
                name, count = f"{base}-{count}", count + 1
            found.add(name)
    return found


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path)) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_point_to_files_and_headings(page):
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(ROOT)}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_docs_named_in_the_readme_exist():
    readme_links = {t.partition("#")[0] for t in relative_links(ROOT / "README.md")}
    for name in ("method", "losses", "pruning-and-inheritance", "reinforced-data", "cli"):
        assert f"docs/{name}.md" in readme_links


def test_slugs_follow_github():
    assert slug("2. Affinity mimicking (the distillation loss)") == (
        "2-affinity-mimicking-the-distillation-loss"
    )
    assert slug("Distil from the command line: `tinyclip-distill`") == (
        "distil-from-the-command-line-tinyclip-distill"
    )
    assert slug("masked_linear") == "masked_linear"
