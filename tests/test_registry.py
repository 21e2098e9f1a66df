"""excb.registry: names to factories, each built from the keyword arguments it accepts."""

from __future__ import annotations

import pytest

from excb.registry import Registry


def test_build_passes_each_entry_only_the_keywords_it_names() -> None:
    reg: Registry[tuple] = Registry("widget")

    @reg.register("pair")
    def pair(a: int, *, b: int = 2) -> tuple:
        return (a, b)

    @reg.register("any")
    def anything(**kwargs: int) -> tuple:
        return tuple(sorted(kwargs.items()))

    assert reg.build("pair", a=1, b=3, c=9) == (1, 3)  # c is not pair's: left out
    assert reg.build("any", a=1, c=9) == (("a", 1), ("c", 9))  # **kwargs: everything
    assert reg.names() == ("pair", "any") and "pair" in reg and "other" not in reg
    with pytest.raises(TypeError):
        reg.build("pair", b=3)  # a required argument still has to be given


def test_unknown_and_duplicate_names_are_clear_errors() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("one")(lambda: 1)
    with pytest.raises(ValueError, match=r"unknown widget 'two' \(known: one\)"):
        reg.build("two")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("one")(lambda: 2)
