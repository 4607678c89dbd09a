"""The published results pages are what recipes/results.py makes of the reports archived in the repository.

Every ``docs/results*.md`` page names the command that wrote it. Where that command reads run folders archived
under ``benchmarks/runs/`` (config, metrics and evaluation reports, no weights: ``--stored``), this test runs it
again into a temporary folder and compares page and JSON with the committed ones, but for the date and the
``--output`` path. A page edited by hand, an archived report changed after the page was built, or a change to
the page's wording that was not followed by ``bash benchmarks/fashion_mnist.sh page`` fails here.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import REPO, load_recipe

_COMMAND = re.compile(r"^```bash\n(python recipes/results\.py [^\n]*)\n```$", re.MULTILINE)


def _archived_pages() -> list[Path]:
    """The results pages whose every run folder is archived in the repository."""
    pages = []
    for page in sorted((REPO / "docs").glob("results*.md")):
        match = _COMMAND.search(page.read_text(encoding="utf-8"))
        if match is None:
            continue
        run_dirs = [arg for arg in shlex.split(match.group(1))[2:] if arg.startswith("benchmarks/runs/")]
        if run_dirs and all((REPO / run).is_dir() for run in run_dirs):
            pages.append(page)
    return pages


PAGES = _archived_pages()


def test_the_benchmark_pages_are_among_those_checked():
    names = {page.name for page in PAGES}
    assert {"results_fashion_mnist.md", "results_fashion_mnist_full_split.md"} <= names, names


def _page_lines(text: str) -> list[str]:
    """The page without the two lines that name when and where it was written."""
    return [line for line in text.splitlines() if not line.startswith(("Generated ", "python recipes/results.py "))]


def _numbers(text: str) -> dict:
    numbers = json.loads(text)
    numbers.pop("date")
    numbers.pop("command")
    return numbers


@pytest.mark.parametrize("page", PAGES, ids=[page.stem for page in PAGES])
def test_a_published_page_is_rebuilt_unchanged_from_the_archive(page, tmp_path, monkeypatch):
    committed = page.read_text(encoding="utf-8")
    argv = shlex.split(_COMMAND.search(committed).group(1))[2:]
    assert "--stored" in argv, f"{page.name}: a published page reads stored reports and evaluates nothing"
    output = tmp_path / page.name
    argv[argv.index("--output") + 1] = str(output)
    monkeypatch.chdir(REPO)  # the command names the run folders relative to the repository
    rebuilt = load_recipe("results").main(argv)
    assert _page_lines(rebuilt) == _page_lines(committed), (
        f"{page.name} differs from what its command makes of the archived reports: rebuild it"
    )
    json_file = page.with_suffix(".json")
    assert _numbers(output.with_suffix(".json").read_text(encoding="utf-8")) == _numbers(
        json_file.read_text(encoding="utf-8")
    ), f"{json_file.name} differs from what its command makes of the archived reports: rebuild it"
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", committed):
        assert (page.parent / image).is_file(), f"{page.name} shows {image}, which is not in docs/"
        assert (output.parent / image).is_file(), f"the command no longer draws {image}"
