"""The benchmarks' measurement helper: round order, warm-up, per-round pairing, medians, ranges and ratios."""

from __future__ import annotations

import pytest

from clipdr.benchmarks import timing


def test_rounds_rotate_the_order_and_discard_the_warm_up():
    calls: list[str] = []
    seconds = {"a": iter([9.0, 1.0, 2.0, 3.0]), "b": iter([9.0, 10.0, 20.0, 30.0]), "c": iter([9.0, 5.0, 5.0, 5.0])}

    def thing(name: str):
        def run() -> timing.Measurement:
            calls.append(name)
            s = next(seconds[name])
            return timing.Measurement(wall_s=s, cpu_s=s / 2, items=2)

        return run

    results = timing.run_rounds({name: thing(name) for name in "abc"}, rounds=3, warmup=1)
    # Round r starts at thing r: no thing always runs right after the same one.
    assert calls == [*"abc", *"bca", *"cab", *"abc"]
    # The warm-up round (9 s each) is gone; round i of every thing sits at index i.
    assert [m.wall_s for m in results["a"]] == [1.0, 2.0, 3.0]
    assert [m.wall_s for m in results["b"]] == [10.0, 20.0, 30.0]
    # Ratios pair rounds: a/b is 0.1 in every round.
    assert timing.ratio(results["a"], results["b"], "wall") == timing.Summary(0.1, 0.1, 0.1)
    assert timing.per_item(results["b"], "cpu") == timing.Summary(5.0, 2.5, 7.5)
    assert timing.rate(results["c"], "wall") == timing.Summary(0.4, 0.4, 0.4)


def test_ratios_are_taken_per_round_then_summarised():
    # Load doubles in round 2 and hits both sides: the per-round ratio stays 2; the ratio of medians would not.
    num = [timing.Measurement(2.0, 2.0), timing.Measurement(8.0, 2.0), timing.Measurement(2.0, 2.0)]
    den = [timing.Measurement(1.0, 1.0), timing.Measurement(4.0, 1.0), timing.Measurement(1.0, 1.0)]
    assert timing.ratio(num, den, "wall") == timing.Summary(2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="rounds differ"):
        timing.ratio(num, den[:2], "wall")


def test_summary_is_median_and_range():
    assert timing.summarize([5.0, 1.0, 3.0, 100.0]) == timing.Summary(4.0, 1.0, 100.0)
    assert timing.summarize([2.0, 1.0, 3.0]).format(".1f") == "2.0 (1.0-3.0)"
    assert timing.summarize([2.0, 1.0, 3.0]).scaled(10) == timing.Summary(20.0, 10.0, 30.0)
    with pytest.raises(ValueError):
        timing.summarize([])


def test_timed_reads_both_clocks_around_the_call():
    ticks = iter([1.0, 4.0])
    measure = timing.timed(lambda: sum(range(1000)), items=4, cpu_clock=lambda: next(ticks))
    m = measure()
    assert m.cpu_s == 3.0 and m.items == 4 and m.wall_s > 0
    assert m.per_item("cpu") == 0.75
