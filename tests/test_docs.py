"""Every runnable Python block in docs/*.md is executed, so the docs cannot rot.

Convention (also in CONTRIBUTING.md):

- Each fenced block whose info string is `python` is run. Blocks in other languages
  (`bash`, `text`, `json`, ...) never are. Indented blocks (inside admonitions) count too.
- The blocks of one page run in order, in one shared namespace, inside a new empty
  temporary working directory. A page may define a tiny model, loss and data in its
  first block and use them in later ones.
- `<!-- docs-test: skip -->` on the last non-blank line before a fence marks the block
  as illustrative: it is shown but not run (for example, it needs several processes).
- `<!-- docs-test: new-dir -->` in the same place moves the page into a new empty working
  directory before the block runs (later blocks stay there). Use it for examples that
  stand alone and each expect an empty `./checkpoints`.

The fenced `python` examples in the docstrings of `DOCSTRING_MODULES` run too, each in a
copy of its module's namespace (as doctest does) inside an empty temporary directory.

Warnings are errors here as everywhere in the suite. Every `MetricCheckpointManager`
a page opened is closed after the page, so no Orbax thread outlives the temporary
directory; pages should still close what they open.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from artifex_ckpt import MetricCheckpointManager

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<word>[\w-]+)\s*-->$")
MARKERS = {"skip", "new-dir"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it starts, its language, marker and code."""

    path: Path
    line: int  # 1-based line of the first code line
    language: str
    marker: str | None
    code: str

    @property
    def runnable(self) -> bool:
        return self.language == "python" and self.marker != "skip"


def extract_blocks(path: Path, text: str | None = None) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order."""
    lines = (path.read_text() if text is None else text).splitlines()
    blocks: list[Block] = []
    previous = ""  # last non-blank line outside a block
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            if lines[index].strip():
                previous = lines[index].strip()
            index += 1
            continue
        indent, ticks = opening["indent"], opening["ticks"]
        body: list[str] = []
        index += 1
        start = index + 1
        while index < len(lines):
            stripped = lines[index].strip()
            if stripped.startswith(ticks) and set(stripped) == {ticks[0]}:
                break
            body.append(lines[index][len(indent) :] if lines[index].startswith(indent) else "")
            index += 1
        else:
            raise ValueError(f"{path}:{start - 1}: code fence is never closed")
        found = MARKER.match(previous)
        marker = found["word"] if found else None
        if marker is not None and marker not in MARKERS:
            raise ValueError(f"{path}:{start - 1}: unknown docs-test marker {marker!r}")
        language = opening["info"].lower().removeprefix("{.").rstrip("}")
        blocks.append(Block(path, start, language, marker, textwrap.dedent("\n".join(body))))
        previous = ""
        index += 1
    return blocks


def run_page(path: Path, workdir: Path, text: str | None = None) -> dict[str, Any]:
    """Run the runnable blocks of one page in one namespace, inside `workdir`.

    Tracebacks point at the Markdown file and its line numbers.
    """
    namespace: dict[str, Any] = {"__name__": f"docs_{path.stem.replace('-', '_')}"}
    os.chdir(workdir)
    for number, block in enumerate(extract_blocks(path, text)):
        if block.marker == "new-dir":
            fresh = workdir / f"block-{number}-line-{block.line}"
            fresh.mkdir()
            os.chdir(fresh)
        if not block.runnable:
            continue
        source = "\n" * (block.line - 1) + block.code
        exec(compile(source, str(path), "exec"), namespace)  # our own docs, on purpose
    return namespace


@pytest.fixture
def managers_closed_after(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close every `MetricCheckpointManager` opened during the test (pages should too)."""
    opened: list[MetricCheckpointManager] = []
    original = MetricCheckpointManager.__init__

    def tracking_init(self: MetricCheckpointManager, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(MetricCheckpointManager, "__init__", tracking_init)
    try:
        yield
    finally:
        for manager in opened:
            manager.close()


PAGES = sorted(DOCS.glob("*.md"))


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_docs_page_runs(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, managers_closed_after: None
) -> None:
    monkeypatch.chdir(tmp_path)  # restores the working directory afterwards
    run_page(page, tmp_path)


def test_docs_exist_and_have_runnable_blocks() -> None:
    names = {p.name for p in PAGES}
    assert {"index.md", "design.md", "api.md"} <= names, names
    runnable = [b for p in PAGES for b in extract_blocks(p) if b.runnable]
    assert len(runnable) >= 10


# The seed document's Usage examples: each must stay in a runnable block. Snippets are
# compared without whitespace, since `ruff format` reformats the docs' code blocks.
SEED_EXAMPLES = {
    "basic": [
        'monitor="val_loss", mode="min", save_top_k=3,',
        "trainer.fit(callbacks=[checkpoint])",
        'print(f"Best checkpoint: {checkpoint.best_checkpoint_path}")',
        'print(f"Best score: {checkpoint.best_score}")',
    ],
    "accuracy (max)": [
        'monitor="val_accuracy",',
        'mode="max",  # Higher accuracy is better',
        "save_top_k=1,  # Keep only the best",
        'filename="best-model-{epoch:02d}-{val_accuracy:.4f}",',
    ],
    "save all": [
        "save_top_k=-1,  # Keep all checkpoints",
        "every_n_epochs=5,  # Save every 5 epochs",
    ],
    "custom filename": [
        "# Filename template supports {epoch} and any metric in logs",
        'filename="model-epoch{epoch:03d}-loss{val_loss:.6f}-acc{val_accuracy:.4f}",',
        'monitor="val_loss",',
    ],
    "combined": [
        "callbacks = CallbackList([ModelCheckpoint(CheckpointConfig(",
        'monitor="val_loss", save_top_k=3,',
        'EarlyStopping(EarlyStoppingConfig(monitor="val_loss", patience=10,',
        "ProgressBarCallback(ProgressBarConfig()),",
        "trainer.fit(callbacks=callbacks)",
    ],
}


def _squeeze(text: str) -> str:
    return "".join(text.split())


@pytest.mark.parametrize("example", sorted(SEED_EXAMPLES))
def test_seed_usage_examples_are_runnable_blocks(example: str) -> None:
    runnable = [_squeeze(b.code) for p in PAGES for b in extract_blocks(p) if b.runnable]
    snippets = [_squeeze(snippet) for snippet in SEED_EXAMPLES[example]]
    assert any(
        all(snippet in code for snippet in snippets) and "fromartifex_ckpt" in code
        for code in runnable
    ), f"the seed's {example!r} example is missing from the runnable docs blocks"


def test_extractor_follows_the_convention() -> None:
    text = textwrap.dedent(
        """\
        # Page

        ```python
        x = 1
        ```

        <!-- docs-test: skip -->
        ```python
        raise SystemExit("not run")
        ```

        ```bash
        echo never
        ```

        !!! note

            <!-- docs-test: new-dir -->
            ```python
            y = x + 1
            ```
        """
    )
    blocks = extract_blocks(Path("page.md"), text)
    assert [(b.language, b.marker, b.runnable, b.line) for b in blocks] == [
        ("python", None, True, 4),
        ("python", "skip", False, 9),
        ("bash", None, False, 13),
        ("python", "new-dir", True, 20),
    ]
    assert blocks[3].code == "y = x + 1"


def test_a_broken_block_fails_and_points_at_its_line(tmp_path: Path) -> None:
    page = tmp_path / "broken.md"
    page.write_text("Intro.\n\n```python\nvalue = 1\n```\n\n```python\nassert value == 2\n```\n")
    workdir = tmp_path / "work"
    workdir.mkdir()
    here = Path.cwd()
    try:
        with pytest.raises(AssertionError) as info:
            run_page(page, workdir)
    finally:
        os.chdir(here)
    frames = [(entry.path, entry.lineno + 1) for entry in info.traceback]
    assert (page, 8) in [(Path(p), line) for p, line in frames]


def test_unknown_marker_is_refused() -> None:
    text = "<!-- docs-test: skipp -->\n```python\npass\n```\n"
    with pytest.raises(ValueError, match="unknown docs-test marker 'skipp'"):
        extract_blocks(Path("typo.md"), text)


# Modules whose docstring examples run. Each example runs alone, in a copy of its module's
# namespace, so it may use the module's names without importing them.
DOCSTRING_MODULES = [
    "artifex_ckpt.policies",
    "artifex_ckpt.validation",
    "artifex_ckpt.plan",
    "artifex_ckpt.housekeeping",
    "artifex_ckpt.naming",
    "artifex_ckpt.settings",
    "artifex_ckpt.manager",
    "artifex_ckpt.owner",
    "artifex_ckpt.lease_store",
    "artifex_ckpt.lease",
    "artifex_ckpt.lease_registry",
]
# Examples that are shown but cannot run alone, by id, with the reason.
DOCSTRING_SKIPS: dict[str, str] = {}
# Examples use an illustrative absolute directory; here it is moved into the test's directory.
EXAMPLE_PATH = re.compile(r"""(["'])/tmp/run\1""")


@dataclass(frozen=True)
class DocExample:
    """One fenced block of one docstring, located in its source file."""

    id: str
    module: str
    path: Path
    line: int
    code: str


def _documented(module: Any) -> Iterator[tuple[str, Any]]:
    """The module and every class, function, method and property defined in it."""
    yield "module", module
    for obj in vars(module).values():
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        yield obj.__qualname__, obj
        if inspect.isclass(obj):
            for member in vars(obj).values():
                if isinstance(member, property):
                    member = member.fget
                member = getattr(member, "__func__", member)
                if inspect.isfunction(member):
                    yield member.__qualname__, member


def docstring_examples(module_name: str) -> list[DocExample]:
    """The runnable `python` blocks in the docstrings of `module_name`."""
    module = importlib.import_module(module_name)
    path = Path(inspect.getfile(module))
    source = path.read_text().splitlines()
    examples = []
    for qualname, obj in _documented(module):
        doc = inspect.getdoc(obj) if obj is not module else inspect.cleandoc(module.__doc__ or "")
        if not doc or obj.__doc__ is None:
            continue
        start = 0 if obj is module else inspect.getsourcelines(obj)[1] - 1
        blocks = [b for b in extract_blocks(path, doc) if b.runnable]
        for number, block in enumerate(blocks):
            first = block.code.splitlines()[0].strip()
            line = next(
                (i + 1 for i in range(start, len(source)) if source[i].strip() == first),
                block.line,
            )
            suffix = f"[{number}]" if len(blocks) > 1 else ""
            short = module_name.removeprefix("artifex_ckpt.")
            examples.append(
                DocExample(f"{short}:{qualname}{suffix}", module_name, path, line, block.code)
            )
    return examples


DOC_EXAMPLES = [e for name in DOCSTRING_MODULES for e in docstring_examples(name)]


def run_docstring_example(example: DocExample, workdir: Path) -> None:
    """Run one example in a copy of its module's namespace; tracebacks point at its source."""
    code = EXAMPLE_PATH.sub(lambda _: repr(str(workdir / "run")), example.code)
    namespace = dict(vars(importlib.import_module(example.module)))
    source = "\n" * (example.line - 1) + code
    exec(compile(source, str(example.path), "exec"), namespace)  # our own docstrings


@pytest.mark.parametrize("example", DOC_EXAMPLES, ids=[e.id for e in DOC_EXAMPLES])
def test_docstring_example_runs(
    example: DocExample,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    managers_closed_after: None,
) -> None:
    if example.id in DOCSTRING_SKIPS:
        pytest.skip(DOCSTRING_SKIPS[example.id])
    monkeypatch.chdir(tmp_path)
    run_docstring_example(example, tmp_path)


def test_docstring_examples_are_found_and_skips_are_current() -> None:
    ids = {e.id for e in DOC_EXAMPLES}
    documented = {e.module for e in DOC_EXAMPLES}
    assert documented == set(DOCSTRING_MODULES), set(DOCSTRING_MODULES) - documented
    assert set(DOCSTRING_SKIPS) <= ids, set(DOCSTRING_SKIPS) - ids


def test_a_broken_docstring_example_fails_at_its_source_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "docstring_example_module.py"
    module.write_text(
        textwrap.dedent(
            '''\
            """A module.

            Example:
                ```python
                assert double(2) == 4
                ```
            """


            def double(x):
                """Twice `x`.

                Example:
                    ```python
                    result = double(3)
                    assert result == 7
                    ```
                """
                return 2 * x
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    examples = docstring_examples("docstring_example_module")
    assert [(e.id, e.line) for e in examples] == [
        ("docstring_example_module:module", 5),
        ("docstring_example_module:double", 15),
    ]
    run_docstring_example(examples[0], tmp_path)
    with pytest.raises(AssertionError) as info:
        run_docstring_example(examples[1], tmp_path)
    assert (module, 16) in [(Path(entry.path), entry.lineno + 1) for entry in info.traceback]
