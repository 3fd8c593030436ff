"""The documentation: README.md is a landing page, every relative link and anchor of README.md and
docs/ resolves, and mkdocs.yml's nav lists every page (the site itself: mkdocs build --strict in CI).

A heading's anchor is its slug as MkDocs (Python-Markdown's toc) computes it: the heading's text
without markup, reduced to ASCII, punctuation dropped, lower case, runs of spaces and hyphens
turned into one '-'; a repeated slug on one page gets '_1', '_2', ...
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import markdown
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
COMMANDS = [
    "bash scripts/setup && hpt-dsl run recipes/hpt.hpt        # set up, then post-train the built-in model with HPT",
    "bash scripts/setup && python3 -m pytest -q                # set up, then run the tests",
]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def slug(heading: str) -> str:
    """A heading's anchor as MkDocs writes it: ``"Training engine: `hpt-dsl run`"`` ->
    ``training-engine-hpt-dsl-run``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page (headings inside fenced code are not headings)."""
    seen: set[str] = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if m:
            base = s = slug(m.group(1))
            n = 0
            while s in seen:
                n += 1
                s = f"{base}_{n}"
            seen.add(s)
    return seen


def links(page: Path) -> list[str]:
    """The targets of the page's Markdown links and images, outside code blocks and code spans."""
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    return [m.group(1) for m in LINK.finditer(text)]


def test_the_slug_is_the_one_mkdocs_writes() -> None:
    assert slug("Training engine: `hpt-dsl run`") == "training-engine-hpt-dsl-run"
    assert slug("DeepSpeed: ZeRO 0–3, several processes") == "deepspeed-zero-03-several-processes"
    assert slug("GRPO against TRL (`bench/vs_trl.py`)") == "grpo-against-trl-benchvs_trlpy"
    assert slug("The HPT paper's ablation on the built-in task") == "the-hpt-papers-ablation-on-the-built-in-task"


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_anchors_are_those_of_the_markdown_that_mkdocs_runs(page: Path) -> None:
    md = markdown.Markdown(extensions=["toc", "tables", "fenced_code"])
    md.convert(page.read_text(encoding="utf-8"))

    def ids(tokens: list[dict]) -> set[str]:
        return {t["id"] for t in tokens} | {i for t in tokens for i in ids(t["children"])}

    assert anchors(page) == ids(md.toc_tokens)


@pytest.mark.parametrize("page", [README, *doc_pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_and_a_heading(page: Path) -> None:
    bad = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_file():
            bad.append(f"{target}: no such file")
            continue
        if page != README and DOCS not in dest.parents:
            bad.append(f"{target}: outside docs/, which the site does not hold (name it as code instead)")
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading '#{anchor}' in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


def test_the_readme_is_a_landing_page_that_begins_with_the_two_commands() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move the detail to docs/"
    start = [ln for ln in lines if ln.strip()][:5]
    assert start == ["# hpt-dsl", "```bash", *COMMANDS, "```"], start


def test_the_readme_links_into_every_top_level_docs_page() -> None:
    targets = {(README.parent / t.partition("#")[0]).resolve() for t in links(README) if not t.startswith("http")}
    missing = [p.relative_to(ROOT) for p in DOCS.glob("*.md") if p.resolve() not in targets]
    assert not missing, missing


def test_the_nav_lists_every_page_and_only_pages_that_exist() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))

    def walk(node: object) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [p for item in node for p in walk(item)]
        if isinstance(node, dict):
            return [p for value in node.values() for p in walk(value)]
        return []

    nav = walk(config["nav"])
    assert len(nav) == len(set(nav)), "a page is listed twice"
    assert sorted(nav) == sorted(str(p.relative_to(DOCS)) for p in doc_pages())
    assert config["strict"] is True
    assert {config["validation"][k] for k in ("omitted_files", "absolute_links", "unrecognized_links", "anchors")} == {
        "warn"
    }


def test_no_page_refers_to_a_readme_it_is_no_longer_in() -> None:
    hits = [str(p.relative_to(ROOT)) for p in doc_pages() if re.search(r"this README", p.read_text(encoding="utf-8"))]
    assert not hits, hits
