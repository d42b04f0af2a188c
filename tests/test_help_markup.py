"""Help text is rich markup to typer: a `[...]` in an option's help was taken for a style and dropped
(`pip install 'llmops[ray]'` printed as `pip install 'llmops'`). Every bracket in every help text shows."""

from __future__ import annotations

import re

import pytest

from llmops.cli.app import COMMANDS, _walk, app, load_command

pytestmark = pytest.mark.unit


def _helps(command) -> list[tuple[list[str], str]]:
    """(the path of subcommand names, a help text) for every command and option under `command`."""
    found = []
    for cmd in _walk(command):
        path = [] if cmd is command else [cmd.name]
        found += [(path, p.help) for p in cmd.params if getattr(p, "help", None)]
    return found


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_bracket_in_a_help_text_is_shown(name):
    from typer.testing import CliRunner

    bracketed = [(path, token) for path, text in _helps(load_command(name))
                 for token in re.findall(r"\[[^\]\s]+\]", text.replace("\\[", "["))]
    for path, token in bracketed:
        result = CliRunner().invoke(app, [name, *path, "--help"], env={"COLUMNS": "400", "TERM": "dumb"})
        assert result.exit_code == 0, result.output
        assert token in result.output, f"llmops {' '.join([name, *path])} --help dropped {token}"
