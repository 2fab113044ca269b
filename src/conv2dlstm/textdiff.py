"""Where two texts first differ, line by line: for the checks that a generated file (config/config.yaml,
the README's result tables) is what the code produces. The standard library only."""

from __future__ import annotations

from itertools import zip_longest


def first_difference(have: str, want: str) -> tuple[int, str, str] | None:
    """``(line number from 1, that line of have, that line of want)`` where the texts first differ
    (a line one text lacks reads as ``""``), or None when every line is equal."""
    for n, (a, b) in enumerate(zip_longest(have.splitlines(), want.splitlines(), fillvalue=""), start=1):
        if a != b:
            return n, a, b
    return None
