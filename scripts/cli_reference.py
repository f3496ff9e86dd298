"""Write docs/cli.md, the command-line reference, from edgetl's argparse parsers:

    PYTHONPATH=. python scripts/cli_reference.py [--check]

``--check`` writes nothing and exits 1 when docs/cli.md is not what the parsers say (a flag added,
renamed or with another default): tests run it, so no flag goes undocumented.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgetl.cli import build_parser  # noqa: E402

OUT = ROOT / "docs" / "cli.md"


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [(name, sub) for a in actions for name, sub in a.choices.items()]


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _options(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.option_strings:
            names = ", ".join(f"`{s}`" for s in action.option_strings)
            metavar = action.metavar or (action.dest.upper() if action.nargs != 0 else None)
            if action.choices is not None and action.nargs != 0:
                metavar = "{" + ",".join(map(str, action.choices)) + "}"
            if metavar and action.nargs != 0:
                names += f" `{metavar}`"
        else:
            names = f"`{action.metavar or action.dest}` (positional)"
        help_text = (action.help or "") % {"default": action.default} if action.help else ""
        if action.required:
            help_text = "required. " + help_text
        rows.append(f"| {names} | {_cell(help_text)} |")
    return rows


def _section(path: str, parser: argparse.ArgumentParser, level: int) -> list[str]:
    lines = [f"{'#' * level} `{path}`", ""]
    if parser.description:
        lines += [" ".join(parser.description.split()), ""]
    rows = _options(parser)
    if rows:
        lines += ["| option | what it does |", "|---|---|", *rows, ""]
    for name, sub in _subcommands(parser):
        lines += _section(f"{path} {name}", sub, min(level + 1, 4))
    return lines


def reference() -> str:
    parser = build_parser()
    lines = [
        "# Command-line reference",
        "",
        "Generated from the argparse parsers by `PYTHONPATH=. python scripts/cli_reference.py`; a test fails when this page",
        "and the parsers disagree. `edgetl COMMAND --help` prints the same. Exit status 2 is a usage or input error, printed",
        "as one line.",
        "",
        *_section("edgetl", parser, 2),
    ]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = reference()
    if "--check" in argv:
        if not OUT.is_file() or OUT.read_text() != text:
            print("docs/cli.md differs from the parsers: run python scripts/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
