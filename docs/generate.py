"""Writes the parts of docs/ that the code already says: the options, the command's arguments, the layout.

    python docs/generate.py           # rewrite them from the code
    python docs/generate.py --check   # exit 1 naming each page that disagrees with the code

A generated part of a page sits between `<!-- generated: NAME -->` and `<!-- end generated: NAME -->`;
the text around it is written by hand. NAME says what fills it:

- `options:GROUP`: one table per `bootfinetune.config` group (bootstrap, train, run, inference): each
  field's name, type and range, default, whether it is resource-only, and its docstring;
- `cli`: the subcommands of `bootfinetune`; `cli:COMMAND`: the arguments of one, from its parser;
- `job:JOB`: the arguments of `ray_jobs/JOB.py`, from its parser;
- `layout`: each module of the package, `ray_jobs/` and `bench/` with the first sentence of its docstring.

`tests/unit/test_docs.py` runs the check, so a page that disagrees with the code fails the suite.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import os
import re
import sys
import typing
from pathlib import Path
from typing import Callable, Iterator, Literal

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, whatever is installed

from bootfinetune.config import FIELD_HELP, FIELD_TYPES, FIELDS, GROUPS, RESOURCE_OPTIONS  # noqa: E402
from bootfinetune.entrypoints.cli import JOB_COMMANDS, build_parser  # noqa: E402
from bootfinetune.entrypoints.jobs import JOB_HELP, job_parser  # noqa: E402

DOCS = REPO / "docs"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w:.-]+) -->\n)(?P<body>.*?)(<!-- end generated: (?P=name) -->)",
                   re.DOTALL)
LAYOUT_ROOTS = ("bootfinetune", "ray_jobs", "bench")
DOCUMENTED_ENVIRONMENT = {"HOME": "~", "XDG_CACHE_HOME": None, "BOOTFINETUNE_STORAGE": None}
"""The environment the pages describe: defaults that come from it read as a user's would, not as this machine's."""


def set_environment(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextlib.contextmanager
def documented_environment() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in DOCUMENTED_ENVIRONMENT}
    set_environment(DOCUMENTED_ENVIRONMENT)
    try:
        yield
    finally:
        set_environment(saved)


def cell(text: str) -> str:
    """Text that stays in one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


# -- options ---------------------------------------------------------------------------------------

def type_text(name: str) -> str:
    """A field's type as a reader writes its value, with its range: `int`, >= 1; `'auto' | 0 | 1`."""
    hint, meta = FIELD_TYPES[name], FIELDS[name].metadata
    if typing.get_origin(hint) is Literal:
        text = " | ".join(repr(c) for c in typing.get_args(hint))
    else:
        text = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
    if meta.get("at_least") is not None:
        text += f", >= {meta['at_least']}"
    elif meta.get("within") is not None:
        lo, hi = meta["within"]
        if lo == float("-inf") and hi is None:
            pass
        elif hi is None:
            text += f", {'>' if meta['open_low'] else '>='} {lo}"
        else:
            text += f", in {'(' if meta['open_low'] else '['}{lo}, {hi}]"
    return text


def default_text(name: str) -> str:
    field = FIELDS[name]
    if field.default is not dataclasses.MISSING:
        return f"`{field.default!r}`"
    return (field.default_factory.__doc__ or "").strip().splitlines()[0]  # type: ignore[union-attr]


def options_table(group: str) -> str:
    rows = ["| option | type | default | resource-only | what it sets |", "|---|---|---|---|---|"]
    for field in dataclasses.fields(GROUPS[group]):
        name = field.name
        rows.append(f"| `{name}` | `{cell(type_text(name))}` | {cell(default_text(name))} | "
                    f"{'yes' if name in RESOURCE_OPTIONS else ''} | {cell(FIELD_HELP.get(name, ''))} |")
    return "\n".join(rows) + "\n"


# -- command-line arguments ------------------------------------------------------------------------

def subcommands() -> dict[str, argparse.ArgumentParser]:
    """`bootfinetune`'s subcommand parsers, in the order `--help` lists them."""
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def subcommand_help() -> dict[str, str]:
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {a.dest: a.help or "" for a in sub._choices_actions}


def expanded_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """An argument's help as `--help` prints it, `%(default)s` and the like filled in."""
    if not action.help:
        return ""
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = parser.prog
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    return action.help % params


def argument_text(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    takes_value = action.nargs != 0
    metavar = action.metavar or action.dest.upper()
    if action.choices is not None and not action.metavar:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    suffix = f" {metavar}" + (" ..." if action.nargs in ("+", "*") else "") if takes_value else ""
    return ", ".join(f"`{flag}{suffix}`" for flag in action.option_strings)


def arguments_table(parser: argparse.ArgumentParser) -> str:
    """A parser's arguments, one row each; when it has a flag for (nearly) every option, those whose
    default is Config's are summed up in one line instead of repeated."""
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    options = [a for a in actions if a.dest in FIELDS]
    all_options = len(options) >= len(FIELDS) - 2
    rows = ["| argument | default | what it does |", "|---|---|---|"]
    summed = 0
    for action in actions:
        canonical = [f"--{action.dest.replace('_', '-')}", f"--no-{action.dest.replace('_', '-')}"]
        if (all_options and action.dest in FIELDS and action.default is argparse.SUPPRESS
                and set(action.option_strings) <= set(canonical)):
            summed += 1
            continue
        default = "" if action.default in (None, argparse.SUPPRESS, []) or action.required else f"`{action.default}`"
        if action.required:
            default = "required"
        rows.append(f"| {argument_text(action)} | {cell(default)} | {cell(expanded_help(parser, action))} |")
    text = "\n".join(rows) + "\n"
    if summed:
        text += (f"\nand a flag for each of the other {summed} options of [the options page](options.md) "
                 f"(`--epochs 3`, `--zero-stage 3`, `--bf16` / `--no-bf16`), at their defaults there.\n")
    return text


def cli_summary() -> str:
    rows = ["| command | what it does |", "|---|---|"]
    for name, text in subcommand_help().items():
        rows.append(f"| [`bootfinetune {name}`](#bootfinetune-{name}) | {cell(text)} |")
    return "\n".join(rows) + "\n"


# -- layout ----------------------------------------------------------------------------------------

def first_sentence(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    paragraph = " ".join(doc.split("\n\n")[0].split())
    match = re.match(r"(.+?\.)(\s|$)", paragraph)
    return match.group(1) if match else paragraph


def layout() -> str:
    rows = ["| file | what it is |", "|---|---|"]
    for root in LAYOUT_ROOTS:
        for path in sorted((REPO / root).rglob("*.py"), key=lambda p: (p.parent.parts, p.name != "__init__.py", p.name)):
            rel = path.relative_to(REPO).as_posix()
            shown = rel[: -len("__init__.py")] if path.name == "__init__.py" else rel
            rows.append(f"| `{shown}` | {cell(first_sentence(path))} |")
    return "\n".join(rows) + "\n"


# -- the pages -------------------------------------------------------------------------------------

def render(name: str) -> str:
    """The text a generated part called `name` holds."""
    with documented_environment():
        return _render(name)


def _render(name: str) -> str:
    kind, _, arg = name.partition(":")
    if kind == "options" and arg in GROUPS:
        return options_table(arg)
    if kind == "cli" and not arg:
        return cli_summary()
    if kind == "cli" and arg in subcommands():
        return arguments_table(subcommands()[arg])
    if kind == "job" and arg in JOB_HELP:
        return arguments_table(job_parser(arg))
    if kind == "layout" and not arg:
        return layout()
    raise KeyError(f"unknown generated part {name!r}; see docs/generate.py for the names")


def required_parts() -> dict[str, list[str]]:
    """The parts each page must hold, so that a new option group, subcommand or job cannot go undocumented
    (a job that is also a subcommand is documented there: both take the arguments of `add_job_arguments`)."""
    commands = list(subcommands())
    jobs_alone = [j for j in JOB_HELP if j not in {job for job, _ in JOB_COMMANDS.values()}]
    return {"options.md": [f"options:{g}" for g in GROUPS],
            "cli.md": ["cli"] + [f"cli:{c}" for c in commands] + [f"job:{j}" for j in jobs_alone],
            "layout.md": ["layout"]}


def regenerated(text: str, renderer: Callable[[str], str] = render) -> str:
    return BLOCK.sub(lambda m: m.group(1) + renderer(m.group("name")) + m.group(4), text)


def problems(renderer: Callable[[str], str] = render) -> list[str]:
    """Each page whose generated parts differ from the code, or that lacks a part it must hold."""
    found = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        if regenerated(text, renderer) != text:
            found.append(f"docs/{page.name}: its generated parts differ from the code; run python docs/generate.py")
    for page, names in required_parts().items():
        path = DOCS / page
        have = {m.group("name") for m in BLOCK.finditer(path.read_text())} if path.exists() else set()
        for name in names:
            if name not in have:
                found.append(f"docs/{page}: no part {name!r}; add <!-- generated: {name} --> and "
                             f"<!-- end generated: {name} --> where it belongs, then run python docs/generate.py")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or --check) the generated parts of docs/.")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page disagrees")
    args = parser.parse_args(argv)
    if args.check:
        found = problems()
        print("\n".join(found) or "docs/ agrees with the code")
        return 1 if found else 0
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        new = regenerated(text)
        if new != text:
            page.write_text(new)
            print(f"wrote docs/{page.name}")
    missing = [p for p in problems() if "no part" in p]
    print("\n".join(missing))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
