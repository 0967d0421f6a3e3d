import pytest

from latentwire.registry import Registry, UnknownKind


def test_registered_entry_is_found_by_name():
    reg = Registry("widget")

    @reg.register("round")
    class Round:
        pass

    assert reg.get("round") is Round and "round" in reg and reg.names() == ["round"]


def test_unknown_name_lists_the_known_ones():
    reg = Registry("widget")
    reg.register("round")(object)
    with pytest.raises(UnknownKind, match=r"unknown widget 'square'; known: round"):
        reg.get("square")


def test_a_name_cannot_be_taken_twice():
    reg = Registry("widget")
    reg.register("round")(int)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("round")(float)
