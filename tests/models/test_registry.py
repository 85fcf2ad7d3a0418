"""Spec strings: the grammar, quoting of long values, and what stays as it was."""

from __future__ import annotations

import pytest

from icdistill.errors import SpecError
from icdistill.models.registry import parse_spec


def test_plain_specs_parse_as_before() -> None:
    assert parse_spec("reference:noise=0.2").options == {"noise": "0.2"}
    s = parse_spec("hf:org/x?dtype=bfloat16,max_side=64&split=0")
    assert (s.scheme, s.target, s.options) == (
        "hf",
        "org/x",
        {"dtype": "bfloat16", "max_side": "64", "split": "0"},
    )
    s = parse_spec("openai:gpt-4o@http://127.0.0.1:8000/v1?timeout=3")
    assert (s.target, s.options) == ("gpt-4o@http://127.0.0.1:8000/v1", {"timeout": "3"})
    assert parse_spec("openai:m?system=It's fine").options == {"system": "It's fine"}  # inner quote: literal
    with pytest.raises(SpecError, match="key=value"):
        parse_spec("hf:org/x?dtype")


def test_quoted_values_keep_commas_ampersands_and_question_marks() -> None:
    s = parse_spec('openai:m@http://h/v1?system="Be brief, exact & kind. Ready?"&temperature=0')
    assert s.target == "m@http://h/v1"
    assert s.options == {"system": "Be brief, exact & kind. Ready?", "temperature": "0"}
    assert parse_spec("openai:m?system='say \"hi\", ok'").options["system"] == 'say "hi", ok'
    assert parse_spec(r'openai:m?system="a \"b\", c"').options["system"] == 'a "b", c'
    with pytest.raises(SpecError, match="not closed"):
        parse_spec('openai:m?system="open, never closed')
    with pytest.raises(SpecError, match="after the closing quote"):
        parse_spec('openai:m?system="a"b')


def test_an_unquoted_question_mark_stays_in_the_value_not_the_model_name() -> None:
    s = parse_spec("openai:gpt-4o@http://h/v1?system=What is shown?")
    assert s.target == "gpt-4o@http://h/v1" and s.options == {"system": "What is shown?"}
