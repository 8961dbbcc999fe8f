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


def test_medians_in_turn_times_each_once_a_round_in_turn(monkeypatch):
    import expert_problem

    calls, times = [], {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 4.0, 9.0])}

    def fake_bench(fn, rep):
        calls.append(fn())
        return next(times[calls[-1]])

    monkeypatch.setattr(expert_problem, "do_bench_cudagraph", fake_bench)
    got = expert_problem.medians_in_turn({"a": lambda: "a", "b": lambda: "b"}, rounds=3, rep=7)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # each first in turn
    assert got == {"a": 2.0, "b": 5.0}


def test_ncu_summary_normalises_units_filters_kernels_and_marks_missing_metrics():
    from ncu_summary import summary

    raw = "\n".join(
        [
            '"ID","Kernel Name","Grid Size","gpu__time_duration.sum",'
            '"gpc__cycles_elapsed.avg.per_second","dram__bytes_read.sum","lts__t_sector_hit_rate.pct"',
            '"","","","nsecond","hz","Mbyte","%"',
            '"3","_up_kernel","(760, 1, 1)","136,064","1,733,664,000","541.6","8.78"',
            '"4","_combine_kernel","(8, 1, 1)","4,896","1,700,000,000","3.0","50"',
        ]
    )
    table = summary(raw, ("_up",)).splitlines()
    assert table[0].startswith("| # | kernel | grid | ms | SM GHz | tensor pipe % | L2 %")
    assert len(table) == 3  # header, rule, the one kernel kept
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[:5] == ["3", "_up_kernel", "(760, 1, 1)", "0.136", "1.734"]
    # tensor pipe, L2, L2 fabric and DRAM % are not in this report; the L2 hit rate and bytes are
    assert cells[5:10] == ["-", "-", "-", "9", "-"] and cells[10] == "0.542"
    assert len(summary(raw).splitlines()) == 4
