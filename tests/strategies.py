"""Hypothesis strategies of the CPU property tests: the generators of tests/inputs.py
drawn through hypothesis, which explores and shrinks them (the table of kernel cases
draws the same generators from a fixed seed)."""
from __future__ import annotations

from hypothesis import strategies as st

from inputs import draw_case, draw_pair_values, draw_tile_edges


class _Draws:
    """random.Random's choice, randint and uniform (float32 values), drawn by hypothesis."""

    def __init__(self, draw):
        self._draw = draw

    def choice(self, options):
        return self._draw(st.sampled_from(options))

    def randint(self, low: int, high: int) -> int:
        return self._draw(st.integers(low, high))

    def uniform(self, low: float, high: float) -> float:
        return self._draw(st.floats(low, high, width=32))


@st.composite
def cases(draw, *, even_rows: bool = False):
    """Any Case (inputs.draw_case); with even_rows, N = 2B as tdpo_loss needs."""
    return draw_case(_Draws(draw), even_rows=even_rows)


@st.composite
def tile_edges(draw, vocab: int):
    return draw_tile_edges(_Draws(draw), vocab)


@st.composite
def pair_inputs(draw):
    return draw_pair_values(_Draws(draw))
