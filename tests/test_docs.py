"""The documentation site: it builds strictly, its API pages cover the package, and its code runs.

Code blocks in ``docs/*.md`` and ``docs/guides/*.md`` are tested as follows:

- a fenced ``python`` block that includes a file with ``--8<-- "path"`` is accepted when the file is one
  that the test suite runs (:data:`TESTED_FILES`);
- every other ``python`` block is executed from the repository root; the blocks of one page run in
  order in one namespace, so a later block may use what an earlier one defined;
- a ``pycon`` block (``>>>`` prompts with their output) is run as a doctest, in the same namespace;
- a block is skipped only when the line before its opening fence is the HTML comment
  ``<!-- docs-test: skip (reason) -->`` (e.g. it needs a GPU, the Hub or a package that is not a
  dependency); the comment is invisible on the site.

Blocks in other languages (``bash``, ``text``...) are not run.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import os
import pkgutil
import re
import runpy
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import robustmix
from robustmix import AdversarialCE, AdversarialStep, CompositionError, PGDAttack

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MKDOCS_YML = ROOT / "mkdocs.yml"

#: Files that guides include with ``--8<--`` and the tests that run them.
TESTED_FILES = {
    "docs/examples/plain_pytorch.py": "tests/test_existing_loops.py",
    "docs/examples/accelerate_loop.py": "tests/test_existing_loops.py",
    "docs/examples/custom_callback.py": "tests/test_docs.py",
    "docs/examples/hf_trainer.py": "tests/test_integration_hf.py",
    "docs/examples/lightning_train.py": "tests/test_integration_lightning.py",
    "docs/examples/timm_train.py": "tests/test_integration_timm.py",
}
#: Modules that need an optional extra, and the package it installs: without it they do not import.
OPTIONAL_MODULES = {"robustmix.integrations.hf": "transformers", "robustmix.integrations.lightning": "lightning"}
SKIP_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*skip\b.*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)(?P<rest>.*)$")
API_DIRECTIVE = re.compile(r"^:::\s+(?P<name>[\w.]+)\s*$", re.MULTILINE)


# ---------------------------------------------------------------------- the strict build


@pytest.mark.docs
@pytest.mark.timeout(300)
def test_mkdocs_build_is_strict_and_clean(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    log = result.stdout + result.stderr
    warnings = [line for line in log.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]
    assert result.returncode == 0 and not warnings, "\n".join(warnings) or log[-3000:]
    for page in ("index.html", "quickstart/index.html", "api/step/index.html", "search/search_index.json"):
        assert (tmp_path / "site" / page).is_file(), page
    broken = {}
    for page in sorted((tmp_path / "site").rglob("*.html")):
        article = re.search(r"<article.*?</article>", page.read_text(), flags=re.DOTALL)
        if article and (stray := _stray_math(article.group(0))):
            broken[page.relative_to(tmp_path / "site").as_posix()] = stray
    assert not broken, f"unrendered math (a $ outside code) on the built pages: {broken}"
    assert 'display="block"' in (tmp_path / "site" / "methods" / "trades" / "index.html").read_text()
    # The main entry point is documented although its name starts with an underscore.
    assert (
        'id="robustmix.core.step.AdversarialStep.__call__"'
        in (tmp_path / "site" / "api" / "step" / "index.html").read_text()
    )


def test_every_returns_section_is_one_value():
    """Google style reads each line at the item's indentation as a new return value: a description that goes on
    must be indented further, or the API page splits one value into several rows."""
    split = []
    for path in sorted((ROOT / "robustmix").rglob("*.py")):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if re.fullmatch(r"\s*(Returns|Yields):", line):
                base, items = len(line) - len(line.lstrip()), []
                for follow in lines[number + 1 :]:
                    indent = len(follow) - len(follow.lstrip())
                    if not follow.strip() or indent <= base:
                        break
                    items.append(indent)
                if items.count(min(items, default=0)) > 1:
                    split.append(f"{path.relative_to(ROOT)}:{number + 1}")
    assert not split, f"Returns sections read as several values: {split}"


def test_quickstart_states_the_digits_preset_as_the_code_has_it():
    from robustmix.cli.presets import PRESETS

    text = (DOCS / "quickstart.md").read_text()
    digits = PRESETS["digits"]
    stated = {
        "eps": float(re.search(r"`eps = ([\d.]+)`", text).group(1)),
        "step_size": float(re.search(r"`step_size = ([\d.]+)`", text).group(1)),
        "attack_steps": int(re.search(r"`K = (\d+)` steps", text).group(1)),
        "batch_size": int(re.search(r"batch (\d+),", text).group(1)),
        "epochs": int(re.search(r"(\d+) epochs of", text).group(1)),
    }
    assert stated == {key: digits[key] for key in stated}
    assert digits["schedule"] == "warmup-cosine" and "warm-up" in text and "one-cycle" not in text


def test_docstrings_use_no_rst_literal_blocks():
    """mkdocstrings renders docstrings as Markdown: RST's ``::`` before an example would show as text."""
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "robustmix").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if line.rstrip().endswith("::") and not line.strip().startswith("#")
    ]
    assert not found, f"RST literal-block markers in docstrings: {found}"


def _stray_math(html_text: str) -> list[str]:
    """Text around every ``$`` left in rendered HTML outside code: math that was not turned into MathML."""
    text = re.sub(r"<pre.*?</pre>|<code.*?</code>|<math.*?</math>", "", html_text, flags=re.DOTALL)
    text = re.sub(r"<[^>]+>", "", text)
    return [text[max(0, i - 40) : i + 40] for i in (m.start() for m in re.finditer(r"\$", text))]


@pytest.mark.parametrize("page", sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")))
def test_every_formula_renders(page):
    """The site's Markdown pipeline (arithmatex, then the MathML hook) leaves no ``$`` outside code: a display
    formula inside a list item indented by 3 spaces instead of 4, for example, comes out as text."""
    import markdown

    from docs._hooks.mathml import on_page_content

    extensions = ["admonition", "attr_list", "tables", "pymdownx.details", "pymdownx.superfences"]
    converter = markdown.Markdown(
        extensions=[*extensions, "pymdownx.arithmatex"], extension_configs={"pymdownx.arithmatex": {"generic": True}}
    )
    rendered = on_page_content(converter.convert((DOCS / page).read_text()))
    assert not _stray_math(rendered), _stray_math(rendered)


# ---------------------------------------------------------------------- navigation and API coverage


def _nav_pages() -> list[str]:
    """Markdown files named in mkdocs.yml's nav (read as text: the file uses no YAML the test needs)."""
    text = MKDOCS_YML.read_text()
    nav = text[text.index("\nnav:") :]
    return re.findall(r":\s*([\w./-]+\.md)\s*$", nav, flags=re.MULTILINE)


def _api_modules() -> dict[str, str]:
    """``{module: page}`` for every ``::: module`` block of docs/api/*.md."""
    found = {}
    for page in sorted((DOCS / "api").glob("*.md")):
        for name in API_DIRECTIVE.findall(page.read_text()):
            found[name] = page.relative_to(DOCS).as_posix()
    return found


def _public_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(robustmix.__path__, prefix="robustmix."):
        if not info.ispkg and not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def test_every_nav_page_exists():
    missing = [page for page in _nav_pages() if not (DOCS / page).is_file()]
    assert not missing, f"mkdocs.yml's nav names pages that do not exist: {missing}"


def test_every_api_block_names_a_module_that_imports():
    modules = _api_modules()
    assert modules, "docs/api/*.md has no ::: blocks"
    broken = {}
    for name, page in modules.items():
        extra = OPTIONAL_MODULES.get(name)
        if extra is not None and importlib.util.find_spec(extra) is None:
            continue
        try:
            importlib.import_module(name)
        except Exception as err:  # any import failure breaks the page
            broken[f"{page}: {name}"] = f"{type(err).__name__}: {err}"
    assert not broken, f"API pages document modules that do not import: {broken}"


def test_every_public_module_has_an_api_page():
    documented = _api_modules()
    missing = [name for name in _public_modules() if name not in documented]
    assert not missing, (
        f"public modules without an API page: {missing}; add `::: <module>` to a page in docs/api/ "
        "(and the page to mkdocs.yml's nav)"
    )


def test_every_api_page_and_method_page_is_in_the_nav():
    nav = set(_nav_pages())
    pages = [p.relative_to(DOCS).as_posix() for p in (*(DOCS / "api").glob("*.md"), *(DOCS / "methods").glob("*.md"))]
    pages += [name for name in ("reliability.md", "results.md") if (DOCS / name).is_file()]
    missing = sorted(page for page in pages if page not in nav)
    assert not missing, f"pages missing from mkdocs.yml's nav: {missing}"


def test_recipes_page_lists_every_recipe_and_method_page():
    index = (DOCS / "recipes.md").read_text()
    unlinked = [p.name for p in sorted((DOCS / "methods").glob("*.md")) if f"(methods/{p.name})" not in index]
    assert not unlinked, f"docs/recipes.md does not link the method pages {unlinked}"
    scripts = [p.name for p in sorted((ROOT / "recipes").glob("*.py")) if not p.name.startswith("_")]
    unnamed = [name for name in scripts if f"`{name}`" not in index]
    assert not unnamed, f"docs/recipes.md does not list the recipes {unnamed}"


# ---------------------------------------------------------------------- code blocks of the guides


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str
    skip: bool


def _blocks(path: Path) -> list[Block]:
    """Fenced code blocks of a Markdown page (also indented ones, e.g. inside admonitions)."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, indent = match["fence"], len(match["indent"])
        previous = next((line for line in reversed(lines[:i]) if line.strip()), "")
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence)}\s*$", lines[j]):
            line = lines[j]
            body.append(line[indent:] if not line[:indent].strip() else line.lstrip())
            j += 1
        page = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
        blocks.append(
            Block(page, i + 1, match["lang"].lower(), "\n".join(body) + "\n", bool(SKIP_MARKER.match(previous)))
        )
        i = j + 1
    return blocks


GUIDE_PAGES = sorted([*DOCS.glob("*.md"), *(DOCS / "guides").glob("*.md")])


def test_block_extraction_sees_fences_markers_and_includes(tmp_path):
    (tmp_path / "page.md").write_text(
        textwrap.dedent(
            """\
            ```python
            x = 1
            ```
            <!-- docs-test: skip (needs a GPU) -->
            ```python
            x.cuda()
            ```
            !!! note
                ```pycon
                >>> x + 1
                2
                ```
            ```python
            --8<-- "docs/examples/custom_callback.py"
            ```
            """
        )
    )
    blocks = _blocks(tmp_path / "page.md")
    assert [(b.lang, b.skip) for b in blocks] == [
        ("python", False),
        ("python", True),
        ("pycon", False),
        ("python", False),
    ]
    assert blocks[2].code == ">>> x + 1\n2\n"
    assert _includes(blocks[3].code) == ["docs/examples/custom_callback.py"]


def _includes(code: str) -> list[str]:
    return re.findall(r"""--8<--\s+["']([^"':]+)""", code)


@pytest.mark.parametrize("page", GUIDE_PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_guide_code_blocks_run(page, monkeypatch):
    monkeypatch.chdir(ROOT)  # blocks are written to run from the repository root
    monkeypatch.setattr(sys, "path", list(sys.path))  # a block may add docs/examples to it
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for block in _blocks(page):
        where = f"{block.page}:{block.line}"
        if block.lang in ("python", "py"):
            included = _includes(block.code)
            if included:
                untested = [path for path in included if path not in TESTED_FILES]
                assert not untested, f"{where} includes {untested}, which no test runs (see TESTED_FILES)"
                assert all((ROOT / path).is_file() for path in included), f"{where} includes a missing file"
                continue
            if block.skip:
                continue
            torch.manual_seed(0)
            exec(compile(block.code, where, "exec"), namespace)
            ran += 1
        elif block.lang == "pycon" and not block.skip:
            test = doctest.DocTestParser().get_doctest(block.code, namespace, where, block.page, block.line)
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
            report: list[str] = []
            torch.manual_seed(0)
            runner.run(test, out=report.append, clear_globs=False)
            namespace.update(test.globs)  # DocTest copied the namespace; later blocks use its names
            assert runner.failures == 0, f"{where}: doctest failed\n{''.join(report)}"
            ran += 1
    # A page may have no runnable block; the count is for the reader of -v output.
    print(f"{page.name}: {ran} blocks run")


# ---------------------------------------------------------------------- the callback guide's code


def _custom_callback():
    spec = importlib.util.spec_from_file_location("custom_callback", DOCS / "examples" / "custom_callback.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _OneHotNet(nn.Module):
    """Logits ``20 * x`` for inputs ``[B, 3]``: a one-hot input is predicted as its class with p > 0.99."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


def _confident_batch() -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.eye(3)[[0, 1, 2, 0]]
    labels = torch.tensor([0, 1, 2, 1])  # the last example is predicted 0 with p > 0.99: a confident mistake
    return inputs, labels


def test_confident_mistake_weights_down_weight_only_confident_mistakes():
    module = _custom_callback()
    inputs, labels = _confident_batch()
    weights = module.confident_mistake_weights(20 * inputs, labels, threshold=0.9, floor=0.1)
    assert torch.allclose(weights.mean(), torch.tensor(1.0))
    assert torch.allclose(weights[3] / weights[0], torch.tensor(0.1))
    assert torch.equal(weights[:3], weights[:1].expand(3))
    # Unconfident mistakes keep full weight: at logits 0.1 * x every probability is below 0.9.
    assert torch.equal(module.confident_mistake_weights(0.1 * inputs, labels, 0.9, 0.1), torch.ones(4))


def test_custom_callback_in_a_step_adds_no_pass_and_reweights_the_loss():
    module = _custom_callback()
    inputs, labels = _confident_batch()
    model = _OneHotNet()
    attack = PGDAttack(eps=0.0, step_size=0.0, steps=2)  # eps 0: x_adv == x, the logits are known
    step = AdversarialStep([AdversarialCE(), module.ConfidentMistakeWeights(momentum=0.5), attack])
    loss, ctx = step(model, inputs, labels)
    assert torch.allclose(ctx.weights[3] / ctx.weights[0], torch.tensor(0.1))
    assert torch.allclose(ctx.extras["mistake_rate"], torch.tensor(0.5 * 0.25))
    per_sample = nn.functional.cross_entropy(20 * inputs, labels, reduction="none")
    assert torch.allclose(loss, (ctx.weights * per_sample).mean())
    loss.backward()
    assert ctx.passes() == (3.0, 3.0)  # K = 2 attack passes + 1 training pass; the callback reuses it


def test_custom_callback_composition_error_names_the_missing_attack():
    module = _custom_callback()
    with pytest.raises(CompositionError, match=r"ConfidentMistakeWeights needs `logits_adv`; add an attack"):
        AdversarialStep([module.ConfidentMistakeWeights(), AdversarialCE()])


def test_custom_callback_state_survives_a_step_state_dict_round_trip():
    module = _custom_callback()
    inputs, labels = _confident_batch()
    callbacks = [PGDAttack(eps=0.0, step_size=0.0, steps=1), module.ConfidentMistakeWeights(), AdversarialCE()]
    step = AdversarialStep(callbacks)
    step(_OneHotNet(), inputs, labels)
    state = step.state_dict()
    assert list(state) == ["1.ConfidentMistakeWeights"]
    fresh = AdversarialStep(
        [PGDAttack(eps=0.0, step_size=0.0, steps=1), module.ConfidentMistakeWeights(), AdversarialCE()]
    )
    fresh.load_state_dict(state)
    assert torch.equal(fresh.callbacks[1].mistake_rate, callbacks[1].mistake_rate)


def test_custom_callback_rejects_bad_settings():
    module = _custom_callback()
    for kwargs in ({"threshold": 1.0}, {"floor": -0.1}, {"momentum": 1.0}):
        with pytest.raises(ValueError):
            module.ConfidentMistakeWeights(**kwargs)


def test_custom_callback_script_trains(capsys):
    runpy.run_path(str(DOCS / "examples" / "custom_callback.py"), run_name="__main__")
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 6 and all("passes per step: 6 forwards, 6 backwards" in row for row in rows)
