"""docs/config.md's tables of `algorithm.tip` and `algorithm.tip_loss` keys are the one list of our keys: every
field of `TipConfig` and `TipLossConfig` has one row, no row names anything else, the documented default is the
dataclass' default, and a key's documented choices are the ones its config accepts."""

import dataclasses
import math
import re
from pathlib import Path

import pytest

from tip_verl.core import config as tip_config
from tip_verl.core.config import TipConfig
from tip_verl.core.selection import selection_rule_names

CONFIG_MD = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def _tip_loss_config():
    from tip_verl.core.distill_losses import TipLossConfig

    return TipLossConfig


def _schedule_names():
    from tip_verl.core.schedule import SCHEDULE_NAMES

    return SCHEDULE_NAMES


SECTIONS = {
    "algorithm.tip": (lambda: TipConfig, "## `algorithm.tip` "),
    "algorithm.tip_loss": (_tip_loss_config, "## `algorithm.tip_loss` "),
}

# documented choices of a key -> what the config accepts
CHOICES = {
    ("algorithm.tip", "rule"): selection_rule_names,
    ("algorithm.tip", "divergence"): lambda: tip_config.DIVERGENCE_NAMES,
    ("algorithm.tip", "mix"): lambda: tip_config.MIX_NAMES,
    ("algorithm.tip", "teacher_trust"): lambda: tip_config.TEACHER_TRUST_NAMES,
    ("algorithm.tip_loss", "schedule"): _schedule_names,
}


def table_rows(heading: str) -> dict:
    """{key: (default cell, meaning cell)} of the first table after the line starting with `heading`."""
    lines = CONFIG_MD.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(heading)]
    assert len(starts) == 1, f"docs/config.md: expected one heading starting with {heading!r}, found {len(starts)}"
    i = starts[0] + 1
    while i < len(lines) and not lines[i].startswith("|"):
        assert not lines[i].startswith("## "), f"docs/config.md: no table under {heading!r}"
        i += 1
    header = [cell.strip() for cell in lines[i].strip().strip("|").split("|")]
    assert header == ["key", "default", "meaning"], f"docs/config.md, table under {heading!r}: header {header}"
    rows = {}
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        key_cell, default_cell, meaning = (cell.strip() for cell in _split_row(line))
        keys = re.findall(r"`([^`]+)`", key_cell)
        assert keys, f"docs/config.md: a row under {heading!r} names no key: {line[:80]}"
        for key in keys:
            assert key not in rows, f"docs/config.md: {key!r} has two rows under {heading!r}"
            rows[key] = (default_cell, meaning)
    return rows


def _split_row(line: str) -> list:
    """The three cells of a table row; a `|` inside backticks does not split."""
    cells, cell, in_code = [], "", False
    for char in line.strip()[1:-1]:
        if char == "`":
            in_code = not in_code
        if char == "|" and not in_code:
            cells.append(cell)
            cell = ""
        else:
            cell += char
    cells.append(cell)
    assert len(cells) == 3, f"docs/config.md: expected 3 cells, got {len(cells)}: {line[:80]}"
    return cells


def parse_default(cell: str):
    match = re.fullmatch(r"`([^`]*)`", cell)
    assert match, f"docs/config.md: a default must be one `value`, got {cell!r}"
    text = match.group(1)
    if text == "null":
        return None
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def documented_choices(meaning: str) -> list:
    """The backticked names after `choices:`, at the top level (not inside parentheses), up to `;` or `. `."""
    assert "choices:" in meaning, f"docs/config.md: no 'choices:' in {meaning[:80]!r}"
    text = meaning.split("choices:", 1)[1]
    names, depth, in_code, code = [], 0, False, ""
    for i, char in enumerate(text):
        if char == "`":
            if in_code and depth == 0:
                names.append(code)
            in_code, code = not in_code, ""
            continue
        if in_code:
            code += char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif depth == 0 and (char == ";" or (char == "." and text[i + 1:i + 2] in (" ", ""))):
            break
    return names


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_field_has_one_row_and_no_other_row(section):
    get_cls, heading = SECTIONS[section]
    fields = [field.name for field in dataclasses.fields(get_cls())]
    rows = table_rows(heading)
    missing = [name for name in fields if name not in rows]
    extra = [key for key in rows if key not in fields]
    assert not missing, f"docs/config.md: {section} keys without a row: {missing}"
    assert not extra, f"docs/config.md: rows under {section} that are no {get_cls().__name__} field: {extra}"


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_documented_defaults_are_the_dataclass_defaults(section):
    get_cls, heading = SECTIONS[section]
    rows = table_rows(heading)
    for field in dataclasses.fields(get_cls()):
        if field.name not in rows:
            continue  # reported by the test above
        documented = parse_default(rows[field.name][0])
        actual = field.default
        if isinstance(actual, float) and isinstance(documented, (int, float)) and not isinstance(documented, bool):
            assert math.isclose(documented, actual), f"{section}.{field.name}: docs say {documented}, code {actual}"
        else:
            assert documented == actual and type(documented) is type(actual), (
                f"{section}.{field.name}: docs/config.md says {rows[field.name][0]}, the default is {actual!r}"
            )


@pytest.mark.parametrize("section, key", sorted(CHOICES))
def test_documented_choices_are_the_accepted_ones(section, key):
    _, heading = SECTIONS[section]
    documented = documented_choices(table_rows(heading)[key][1])
    accepted = list(CHOICES[(section, key)]())
    assert sorted(documented) == sorted(accepted), (
        f"docs/config.md, {section}.{key}: documents {documented}, the config accepts {accepted}"
    )
    assert len(documented) == len(set(documented)), f"{section}.{key}: a choice is listed twice: {documented}"


def test_the_parser_reads_nested_code_and_parentheses():
    meaning = "x; choices: `a` (one `(b)` c), `d`, `e` (f; g). The rest names `h`"
    assert documented_choices(meaning) == ["a", "d", "e"]
    assert parse_default("`null`") is None and parse_default("`0.5`") == 0.5 and parse_default("`k3`") == "k3"
