"""The docs hold together: relative links between README.md and docs/ resolve (files and #anchors),
the CLI reference is what scripts/cli_reference.py writes from the parser, every flag a guide names
is a real flag, every public name is in the Python API reference, and sentences stay short."""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
# pages another tool writes; a link to one is checked once the page exists
GENERATED_ELSEWHERE = {DOCS / "reference" / "config.md"}
# flags of other programs that the guides name (scripts/setup.sh, pip)
OTHER_FLAGS = {"--gemma3", "--index-url", "--no-deps"}
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """Text outside fenced code and outside the tables bench/update_readme.py writes."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"<!-- results:([\w-]+) -->.*?<!-- /results:\1 -->", "", text, flags=re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors | set(re.findall(r'<a id="([^"]+)"></a>', text))


def _links():
    for page in PAGES:
        for match in LINK.finditer(_prose(page.read_text())):
            target = match.group(1) or match.group(2)
            if not re.match(r"[a-z]+:", target):
                yield page, target


def test_relative_links_resolve():
    broken = []
    for page, target in _links():
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if file in GENERATED_ELSEWHERE and not file.exists():
            continue
        if not file.exists():
            broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_reachable_from_the_index():
    linked = {(page.parent / t.partition("#")[0]).resolve() for page, t in _links() if page.name == "index.md"}
    missing = [p.relative_to(ROOT) for p in DOCS.rglob("*.md") if p.name != "index.md" and p not in linked]
    assert not missing, missing


def test_the_cli_reference_is_up_to_date():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "cli_reference.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def _real_flags() -> set[str]:
    from megedit.cli import build_parser

    parser = build_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for verb in sub.choices.values():
        verb.format_help()  # builds the deferred option groups
        flags |= {s for a in verb._actions for s in a.option_strings}
    return flags


def test_flags_named_in_the_user_pages_exist():
    pages = [ROOT / "README.md", DOCS / "tutorial.md", *sorted((DOCS / "how-to").glob("*.md")),
             *sorted((DOCS / "reference").glob("*.md"))]
    from torch.distributed.run import get_args_parser

    torchrun = {s for a in get_args_parser()._actions for s in a.option_strings}  # the launcher the how-to uses
    real = _real_flags() | OTHER_FLAGS | torchrun
    unknown = {(page.relative_to(ROOT).as_posix(), flag) for page in pages
               for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", page.read_text())
               if flag not in real and not (flag.endswith("-") and any(r.startswith(flag) for r in real))}  # --ft-*
    assert not unknown, sorted(unknown)


def test_verbs_named_in_the_user_pages_exist():
    from megedit.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    pages = [ROOT / "README.md", DOCS / "tutorial.md", *sorted((DOCS / "how-to").glob("*.md")),
             *sorted((DOCS / "reference").glob("*.md"))]
    command = r"(?:^|&&\s*)(?:[A-Z_]+=\S+\s+)*(?:\.venv/bin/)?megedit\s+(?:--[a-z-]+\s+)*([a-z][a-z-]*)"
    named = set()
    for page in pages:
        text = page.read_text()
        shell = "\n".join(re.findall(r"^```bash[^\n]*\n(.*?)^```", text, flags=re.S | re.M))
        verbs = re.findall(command, shell, flags=re.M) + re.findall(r"`megedit ([a-z][a-z-]*)", text)
        named |= {(page.relative_to(ROOT).as_posix(), verb) for verb in verbs}
    unknown = sorted((page, verb) for page, verb in named if verb not in sub.choices)
    assert not unknown, unknown


def test_the_python_reference_names_every_public_name():
    import megedit

    text = (DOCS / "reference" / "python-api.md").read_text()
    missing = [name for name in megedit.__all__ if f"`{name}`" not in text]
    assert not missing, missing
    for cls, members in {"EditedModel": ["generate", "chat", "route", "routing", "vectors_for", "routed", "enabled",
                                         "unedited", "close", "save_pretrained", "from_pretrained"],
                         "MeGEditor": ["fit"], "MeGConfig": ["from_file", "from_dict", "to_dict"],
                         "EvalReport": ["table", "save", "load", "to_dict"]}.items():
        for member in members:
            assert hasattr(getattr(megedit, cls), member) or member == "enabled", f"{cls}.{member}"
            assert f".{member}" in text or f"{member}" in text, f"{cls}.{member} is not documented"


def _sentences(text: str) -> list[str]:
    text = re.sub(r"<!--.*?-->", "", _prose(text), flags=re.S)
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith(("|", "#", "![", "<a "))]
    text = re.sub(r"\]\([^)]*\)", "]", re.sub(r"`[^`]*`", "CODE", "\n".join(lines)))
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z`*(\-\d\"])|\n(?=\s*(?:[-*] |\d+\. ))", text)
    return [p for p in parts if re.search(r"[A-Za-z]", p)]


@pytest.mark.parametrize("page", [p.relative_to(ROOT).as_posix() for p in PAGES if p.name != "cli.md"])
def test_sentences_are_short(page):
    words = [len(s.split()) for s in _sentences((ROOT / page).read_text())]
    assert sum(words) / len(words) <= 25, f"{page}: {sum(words) / len(words):.1f} words per sentence"


def test_no_issue_numbers_in_the_docs():
    hits = [f"{p.relative_to(ROOT)}: {m}" for p in PAGES for m in re.findall(r"(?:issue|PR) #?\d+|#\d{2,}\b", _prose(p.read_text()))]
    assert not hits, hits
