"""MkDocs hooks: the settings and CLI reference pages, rendered from the code at build time so they cannot drift.

`reference/settings.md` gets a table from `rehydrate.core.settings.Settings.model_fields`; `reference/cli.md` gets
one section per command from the Typer app's command tree (`typer.main.get_command`). Each page holds a marker
comment where the generated Markdown goes; a page without its marker fails the build.
"""

from __future__ import annotations

import enum
import types
import typing
from typing import Any

import annotated_types
import typer
from mkdocs.exceptions import PluginError
from pydantic import AliasChoices, AliasPath, SecretStr
from pydantic.fields import FieldInfo

SETTINGS_MARKER = "<!-- generated: settings -->"
CLI_MARKER = "<!-- generated: cli -->"
EXIT_CODES_MARKER = "<!-- generated: exit codes -->"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    generated = {
        "reference/settings.md": {SETTINGS_MARKER: settings_markdown},
        "reference/cli.md": {EXIT_CODES_MARKER: exit_codes_markdown, CLI_MARKER: cli_markdown},
    }.get(page.file.src_uri)
    for marker, render in (generated or {}).items():
        if marker not in markdown:
            raise PluginError(f"{page.file.src_uri} lost its marker {marker!r}: the generated reference has no place")
        markdown = markdown.replace(marker, render())
    return markdown


# -- settings -----------------------------------------------------------------------------------------------------


def cell(text: str) -> str:
    """Text fit for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;")


def env_names(name: str, field: FieldInfo) -> list[str]:
    """The environment variables a field is read from: its aliases, or REHYDRATE_<FIELD>."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [choice for choice in alias.choices if isinstance(choice, str)]
    if isinstance(alias, str):
        return [alias]
    if isinstance(alias, AliasPath):
        raise PluginError(f"setting {name!r}: an AliasPath is not an environment variable")
    return [f"REHYDRATE_{name.upper()}"]


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in args)
    if origin in (types.UnionType, typing.Union):
        parts = [type_name(arg) for arg in args if arg is not type(None)]
        return " \\| ".join(parts) + (" or unset" if type(None) in args else "")
    if origin is list:
        return f"comma-separated list of {type_name(args[0])}" if args else "list"
    if origin is typing.Annotated:
        return type_name(args[0])
    if annotation is SecretStr:
        return "secret (masked when printed)"
    if isinstance(annotation, type):
        return {"str": "text", "int": "integer", "bool": "boolean", "Path": "path", "float": "number"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation)


def default_text(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True, validated_data={})
    if value is None or value == []:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"`{value:,}`"
    return f"`{value}`"


def bounds(field: FieldInfo) -> str:
    low = high = None
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Le):
            high = item.le
    if low is not None and high is not None:
        return f"{low} to {high}"
    if low is not None:
        return f"at least {low}"
    if high is not None:
        return f"at most {high}"
    return ""


def settings_markdown() -> str:
    from rehydrate.core.settings import Settings

    lines = [
        "| setting | variables | type | default | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, field in Settings.model_fields.items():
        names = f"`{name}` | " + ", ".join(f"`{env}`" for env in env_names(name, field))
        kind = type_name(field.annotation)
        limit = bounds(field)
        if limit:
            kind += f", {limit}"
        meaning = cell(field.description or "")
        lines.append(f"| {names} | {kind} | {default_text(field)} | {meaning} |")
    return "\n".join(lines)


# -- the command line ---------------------------------------------------------------------------------------------


def exit_codes_markdown() -> str:
    """The exit codes, as the command's own module states them."""
    import rehydrate.cli

    doc = rehydrate.cli.__doc__ or ""
    paragraphs = [" ".join(p.split()) for p in doc.split("\n\n")]
    found = [p for p in paragraphs if p.startswith("Exit codes:")]
    if not found:
        raise PluginError("rehydrate.cli's docstring no longer states its exit codes ('Exit codes: ...')")
    return found[0]


def _param_names(param: Any) -> str:
    if param.param_type_name == "argument":
        return f"`{param.metavar or param.name.upper()}`"
    names = [*param.opts, *param.secondary_opts]
    return " / ".join(f"`{n}`" for n in names)


def _param_type(param: Any) -> str:
    if getattr(param, "is_flag", False):
        return "flag"
    kind = type_name(param.type_descriptor.annotation)
    low, high = param.min, param.max
    if low is not None and high is not None:
        kind += f", {low} to {high}"
    elif low is not None:
        kind += f", at least {low}"
    elif high is not None:
        kind += f", at most {high}"
    return kind


def _param_default(param: Any) -> str:
    """The default worth showing: a value, or which side of an on/off flag is the default (plain flags: none)."""
    default = param.default
    if default is None:
        return ""
    if isinstance(default, bool):
        if not param.secondary_opts:
            return ""
        return f"`{param.opts[0] if default else param.secondary_opts[0]}`"
    if isinstance(default, int) and abs(default) >= 10_000:
        return f"`{default:,}`"
    return f"`{default}`"


def _param_help(param: Any) -> str:
    text = cell(getattr(param, "help", None) or "")
    if param.required:
        text = f"Required. {text}".strip()
    return text


def _usage(command: Any, path: list[str]) -> str:
    pieces = [*path, "[OPTIONS]"]
    for param in command.params:
        if param.param_type_name == "argument":
            name = param.metavar or param.name.upper()
            pieces.append(name if param.required else f"[{name}]")
    if getattr(command, "commands", None) is not None:
        pieces.append("COMMAND [ARGS]...")
    return " ".join(pieces)


def _command_section(command: Any, path: list[str]) -> list[str]:
    """A heading per command (level 2 for `rehydrate` and its commands, 3 inside a group), its help, its usage and
    a table of its arguments and options; then its subcommands. Hidden (deprecated) commands are left out."""
    usage = _usage(command, path)
    title = " ".join(path)
    lines = [f"{'#' * max(2, len(path))} `{title}`", ""]
    help_text = (command.help or "").strip()
    if help_text:
        lines += [help_text.replace("\b\n", ""), ""]
    lines += ["```", usage, "```", ""]
    params = [p for p in command.params if not getattr(p, "hidden", False)]
    if params:
        lines += ["| argument or option | type | default | meaning |", "| --- | --- | --- | --- |"]
        for param in params:
            row = [_param_names(param), _param_type(param), _param_default(param), _param_help(param)]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    subcommands = getattr(command, "commands", None)
    if subcommands is not None:
        for name, sub in subcommands.items():
            if sub.hidden:
                continue
            lines += _command_section(sub, [*path, name])
    return lines


def cli_markdown() -> str:
    from rehydrate.cli import app

    root = typer.main.get_command(app)
    help_options = ", ".join(f"`{name}`" for name in root.context_settings.get("help_option_names", ["--help"]))
    lines = [f"Every command and group takes {help_options} to print its help.", ""]
    lines += _command_section(root, ["rehydrate"])
    return "\n".join(lines).rstrip() + "\n"
