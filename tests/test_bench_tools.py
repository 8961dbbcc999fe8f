"""The benchmark scripts' shared helpers that run without a GPU."""

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from expert_problem import in_turn  # noqa: E402


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_in_turn_puts_each_first_equally_often(n):
    items = [f"v{i}" for i in range(n)]
    orders = [in_turn(items, r) for r in range(3 * n)]
    assert all(sorted(o) == sorted(items) for o in orders)  # every round measures all of them
    assert Counter(o[0] for o in orders) == {v: 3 for v in items}
    assert in_turn(["off", "on"], 0) == ["off", "on"] and in_turn(["off", "on"], 1) == ["on", "off"]
