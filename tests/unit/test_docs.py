"""The docs: the site builds with `mkdocs build --strict` and its reference pages are generated from the code; the
README is a front page that opens with the two commands; every `rehydrate …` command the README and the docs name
exists; the examples the pages include are the files the tests run; no page speaks of work sessions or issues."""

from __future__ import annotations

import dataclasses
import html
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import AliasChoices
from temporalio.api.common.v1 import Payload
from temporalio.converter import DataConverter

from rehydrate import Event
from rehydrate.cli import app
from rehydrate.core.settings import Settings
from rehydrate.models import RepairInput, ReplayInput, SnapshotRebuildInput, TailInput, VerifyInput
from rehydrate.starter import check_replay_input, check_verify_input

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
README = REPO / "README.md"
SNIPPETS = DOCS / "snippets"

# The README's first code block, verbatim: CI runs the second line as it stands.
FIRST_COMMANDS = [
    "python3 -m pip install -e . && python3 -m rehydrate demo             "
    "# the demo: a real replay on Temporal + Postgres",
    "python3 -m pip install -e '.[dev]' && python3 -m pytest              # the whole test suite",
]


def pages() -> list[Path]:
    """The README and every Markdown page of the site."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def code_blocks(text: str) -> Iterator[tuple[str, str]]:
    """(language, body) of each fenced code block."""
    for match in re.finditer(r"^(`{3,})([\w+-]*)[^\n]*\n(.*?)^\1\s*$", text, re.MULTILINE | re.DOTALL):
        yield match.group(2), match.group(3)


# -- the site -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built as CI builds it: `mkdocs build --strict` (a broken link or a missing page fails)."""
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


def test_the_site_builds_with_mkdocs_strict(site: Path) -> None:
    for page in ("index.html", "getting-started/index.html", "reference/api/index.html", "benchmarks/index.html"):
        assert (site / page).is_file(), page
    api = (site / "reference/api/index.html").read_text()
    for name in ("Projection", "EventStore", "create_pool", "Repository", "Upcasters", "ConcurrencyError"):
        assert f'id="rehydrate.{name}"' in api, f"the API page documents rehydrate.{name}"


def page_text(path: Path) -> str:
    """A built page's text: tags stripped, entities decoded, whitespace collapsed."""
    text = html.unescape(re.sub(r"<[^>]+>", " ", path.read_text()))
    return " ".join(text.split())


def test_the_settings_reference_is_generated_from_the_settings_model(site: Path) -> None:
    assert "<!-- generated" not in (site / "reference/settings/index.html").read_text()
    page = page_text(site / "reference/settings/index.html")
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        variables = alias.choices if isinstance(alias, AliasChoices) else [f"REHYDRATE_{name.upper()}"]
        for variable in variables:
            assert variable in page, f"setting {name}: {variable}"
        if field.description:
            assert " ".join(field.description.split()) in page, f"setting {name}: its description"


def test_the_cli_reference_is_generated_from_the_typer_app(site: Path) -> None:
    page = (site / "reference/cli/index.html").read_text()
    assert "<!-- generated" not in page
    commands = list(visible_commands(typer.main.get_command(app), ["rehydrate"]))
    assert len(commands) > 30
    for path, command in commands:
        assert f"<code>{' '.join(path)}</code>" in page, " ".join(path)
        for param in command.params:
            if param.param_type_name == "option" and not param.hidden:
                assert f"<code>{param.opts[0]}</code>" in page, f"{' '.join(path)} {param.opts[0]}"
    assert "Exit codes: 0" in page


def visible_commands(command: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
    yield path, command
    for name, sub in (getattr(command, "commands", None) or {}).items():
        if not sub.hidden:
            yield from visible_commands(sub, [*path, name])


# -- the README -----------------------------------------------------------------------------------------------------


def test_the_readme_is_a_front_page_of_at_most_250_lines() -> None:
    assert len(README.read_text().splitlines()) <= 250


def test_the_readme_opens_with_the_demo_and_the_test_commands() -> None:
    lines = README.read_text().splitlines()
    assert lines[0] == "# rehydrate"
    language, body = next(code_blocks(README.read_text()))
    assert language == "bash"
    assert body.splitlines() == FIRST_COMMANDS
    assert lines[2:6] == ["```bash", *FIRST_COMMANDS, "```"], "the two commands come first"


def test_the_readme_projection_example_is_the_file_the_tests_run() -> None:
    python = [body for language, body in code_blocks(README.read_text()) if language == "python"]
    assert python == [(SNIPPETS / "order_totals.py").read_text()]


def test_the_readme_links_point_at_files_that_exist() -> None:
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if "://" not in link]
    assert local, "the README links into the docs"
    for link in local:
        assert (REPO / link).exists(), link


def test_no_page_speaks_of_work_sessions_or_issue_numbers() -> None:
    pattern = re.compile(r"session [0-9]|issue #[0-9]", re.IGNORECASE)
    files = [README, *(p for p in DOCS.rglob("*") if p.is_file() and p.suffix in {".md", ".py", ".json", ".jsonl"})]
    found = [
        f"{path.relative_to(REPO)}:{number}: {line}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert found == []


# -- every command the docs name exists -----------------------------------------------------------------------------


def named_commands(text: str) -> Iterator[list[str]]:
    """The arguments of each `rehydrate …` (or `python -m rehydrate …`) command in the code blocks and inline code of
    a page: shell lines split at `&&`, `;`, `|` and `&`, environment assignments dropped, `[`/`]` of optional parts
    and `…` left out."""
    shell = [body for language, body in code_blocks(text) if language in ("bash", "sh", "console", "")]
    prose = re.sub(r"^(`{3,}).*?^\1\s*$", "", text, flags=re.MULTILINE | re.DOTALL)
    inline = [span for span in re.findall(r"`([^`\n]+)`", prose) if re.match(r"(python3? -m )?rehydrate ", span)]
    for line in [line for body in shell for line in body.splitlines()] + inline:
        for segment in re.split(r"&&|;|\|\||(?<![\w-])\|(?![\w-])|&(?!\w)", line.removeprefix("$ ")):
            try:
                words = shlex.split(segment, comments=True)
            except ValueError:  # an unbalanced quote: a fragment of prose, not a command
                continue
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                words.pop(0)
            if words[:3] in (["python3", "-m", "rehydrate"], ["python", "-m", "rehydrate"]):
                words = words[2:]
            if words[:1] == ["rehydrate"]:
                yield [w.strip("[]") for w in words[1:] if w.strip("[]") and w not in ("…", "...")]


def resolve(args: list[str]) -> list[str]:
    """Walk the click command tree as `rehydrate ARGS` would: the command must exist, and each option must be one of
    its options (or a help option), with no more positional arguments than it takes. Returns the command's path."""
    root = typer.main.get_command(app)
    helps = set(root.context_settings.get("help_option_names", ["--help"]))
    command, ctx, path, rest = root, root.context_class(root, info_name="rehydrate"), ["rehydrate"], list(args)
    while getattr(command, "commands", None) is not None:
        group_options = {o for p in command.params for o in [*p.opts, *p.secondary_opts]} | helps
        while rest and rest[0].startswith("-"):
            if rest[0] not in group_options:
                raise ValueError(f"{' '.join(path)} has no option {rest[0]}")
            rest.pop(0)
        if not rest:
            return path
        name, command, rest = command.resolve_command(ctx, rest)  # a UsageError names an unknown command
        path.append(name)
        ctx = command.context_class(command, info_name=name, parent=ctx)
    options = {o: p for p in command.params if p.param_type_name == "option" for o in [*p.opts, *p.secondary_opts]}
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    positional = 0
    while rest:
        word = rest.pop(0)
        if word.startswith("-") and not re.fullmatch(r"-\d+", word):
            name = word.split("=", 1)[0]
            if name in helps:
                continue
            if name not in options:
                raise ValueError(f"{' '.join(path)} has no option {name}")
            if not options[name].is_flag and "=" not in word and rest:
                rest.pop(0)  # the option's value
        else:
            positional += 1
    if positional > len(arguments):
        raise ValueError(f"{' '.join(path)} takes {len(arguments)} argument(s), the docs give {positional}: {args}")
    return path


def test_the_command_checker_refuses_a_command_an_option_or_an_argument_that_does_not_exist() -> None:
    assert resolve(["replay", "start", "order_summary", "--lanes", "8", "--wait"]) == ["rehydrate", "replay", "start"]
    assert resolve(["dead-letters", "order_summary"]) == ["rehydrate", "dead-letters", "list"]  # the old spelling
    for wrong in (["replay", "begin", "x"], ["replay", "start", "x", "--lane", "8"], ["verify", "a", "b"], ["--vers"]):
        with pytest.raises(Exception):  # noqa: B017 - click's UsageError or the checker's ValueError
            resolve(wrong)


def test_every_rehydrate_command_in_the_readme_and_the_docs_exists() -> None:
    seen: set[str] = set()
    problems = []
    for page in pages():
        for args in named_commands(page.read_text()):
            try:
                seen.add(" ".join(resolve(args)))
            except Exception as error:
                problems.append(f"{page.relative_to(REPO)}: rehydrate {' '.join(args)}: {error}")
    assert problems == []
    assert len(seen) > 30, f"the docs name most commands (found {len(seen)})"


# -- the examples the pages include ---------------------------------------------------------------------------------


def test_every_included_snippet_exists_and_every_snippet_is_included() -> None:
    included = {m for page in pages() for m in re.findall(r'--8<-- "([^"]+)"', page.read_text())}
    snippets = {str(p.relative_to(SNIPPETS)) for p in SNIPPETS.rglob("*") if p.is_file() and p.suffix != ".pyc"}
    # A page may also include a file of the repository (an example module), whole or by lines ("path:16:93").
    from_repository = {name for name in included if "/" in name and not (SNIPPETS / name).exists()}
    assert all((REPO / name.split(":")[0]).is_file() for name in from_repository), from_repository
    assert {name for name in included - from_repository if name != "CONTRIBUTING.md"} == snippets


UI_INPUTS: dict[str, type] = {
    "replay.json": ReplayInput,
    "replay-tuned.json": ReplayInput,
    "sandbox.json": ReplayInput,
    "tail.json": TailInput,
    "verify.json": VerifyInput,
    "snapshot-rebuild.json": SnapshotRebuildInput,
    "repair.json": RepairInput,
}


@pytest.mark.parametrize("name", sorted(UI_INPUTS))
def test_each_web_ui_input_in_the_docs_is_a_valid_workflow_input(name: str) -> None:
    kind = UI_INPUTS[name]
    data = (SNIPPETS / "ui" / name).read_bytes()
    # As the Web UI sends it: one JSON payload, decoded by the workers' default converter.
    value = DataConverter.default.payload_converter.from_payload(
        Payload(metadata={"encoding": b"json/plain"}, data=data), kind
    )
    fields = {f.name for f in dataclasses.fields(kind)}
    given = set(json.loads(data))
    assert given <= fields, f"{name}: unknown fields {given - fields} (the converter would drop them silently)"
    if isinstance(value, ReplayInput):
        check_replay_input(value)
    if isinstance(value, VerifyInput):
        check_verify_input(value)


def test_the_ui_inputs_cover_every_file_in_the_folder() -> None:
    assert {p.name for p in (SNIPPETS / "ui").iterdir()} == set(UI_INPUTS)


def test_the_versioning_example_reads_every_stored_shape_as_the_current_one() -> None:
    versioning = importlib.import_module("docs.snippets.versioning")
    upcasters, projection = versioning.order_events, versioning.order_channels
    assert upcasters.current_version("OrderPlaced") == 3
    shapes = {
        1: {"order_id": "order-1", "customer_id": "c-7"},
        2: {"order_id": "order-1", "customer_id": "c-7", "currency": "USD", "channel": "shop"},
        3: {"order_id": "order-1", "currency": "EUR", "channel": "web", "customer": {"id": "c-7"}},
    }
    expected = {
        1: {"customer_id": "c-7", "channel": "web", "currency": "EUR"},
        2: {"customer_id": "c-7", "channel": "shop", "currency": "USD"},
        3: {"customer_id": "c-7", "channel": "web", "currency": "EUR"},
    }
    for version, data in shapes.items():
        stored = Event(1, "order-1", 1, "OrderPlaced", version, dict(data), {}, datetime(2025, 1, 1, tzinfo=UTC))
        current = upcasters.upcast(stored)
        assert current.schema_version == 3
        assert projection.handlers["OrderPlaced"](None, current) == expected[version]
        assert stored.data == data, "upcasting leaves the stored event as it was"
