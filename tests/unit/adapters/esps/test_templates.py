import pytest

from adapters.esps.templates import TemplateError, render

FIELDS = {"FNAME": "Ada", "LNAME": "", "ORDERS": 3, "TIER": "gold", "CARTURL": None}


def test_tags_are_replaced_and_missing_ones_render_empty():
    assert render("Hi *|FNAME|* *|LNAME|*!", FIELDS) == "Hi Ada !"
    assert render("*|NOPE|*x", FIELDS) == "x"
    assert render("You ordered *|ORDERS|* times", FIELDS) == "You ordered 3 times"


def test_if_else_gives_fallbacks_for_missing_values():
    template = "*|IF:LNAME|*Dear *|FNAME|* *|LNAME|**|ELSE:|*Hi *|FNAME|**|END:IF|*"
    assert render(template, FIELDS) == "Hi Ada"
    assert render(template, {**FIELDS, "LNAME": "Lovelace"}) == "Dear Ada Lovelace"
    assert render("*|IFNOT:CARTURL|*No cart*|END:IF|*", FIELDS) == "No cart"


def test_blocks_nest():
    template = "*|IF:TIER|*[*|TIER|**|IF:CARTURL|* cart*|ELSE:|* no cart*|END:IF|*]*|END:IF|*"
    assert render(template, FIELDS) == "[gold no cart]"
    assert render(template, {**FIELDS, "TIER": None}) == ""


def test_html_escaping_and_broken_templates():
    assert render("*|FNAME|*", {"FNAME": "<b>"}, escape=True) == "&lt;b&gt;"
    for broken in ("*|IF:X|*a", "a*|END:IF|*", "*|ELSE:|*"):
        with pytest.raises(TemplateError):
            render(broken, FIELDS)
