"""Controls at matched KL: the strength search (evaluation.matching) and evaluate's use of it."""

from __future__ import annotations

import math

import pytest

from patchkit.evaluation.matching import KL_TOLERANCE, match_kl


def meter(scale: float, power: float = 2.0, calls: list | None = None):
    """A stand-in capability meter: KL = scale * strength ** power (the 'patch' is its strength)."""
    def measure(strength):
        if calls is not None:
            calls.append(strength)
        return {"kl": scale * strength ** power, "perplexity": 10.0}
    return measure


@pytest.mark.parametrize("scale,power,target", [(0.01, 2.0, 0.05), (1.0, 2.0, 0.05), (0.002, 1.3, 0.08), (5.0, 3.0, 0.01)])
def test_the_search_lands_within_the_tolerance(scale, power, target):
    calls = []
    m = match_kl(meter(scale, power, calls), lambda s: s, target)
    assert m.matched and abs(math.log(m.capability["kl"] / target)) < KL_TOLERANCE
    assert m.patch == m.strength and m.strength in calls
    assert m.evaluations == len(calls) <= 6 and m.kl_at_start == scale


def test_a_control_already_at_the_patchs_kl_is_measured_once():
    calls = []
    m = match_kl(meter(0.05, calls=calls), lambda s: s, 0.0502)
    assert m.matched and m.strength == 1.0 and calls == [1.0]


def test_the_next_seed_can_start_where_the_last_one_ended():
    first = match_kl(meter(0.001), lambda s: s, 0.1)
    calls = []
    again = match_kl(meter(0.001, calls=calls), lambda s: s, 0.1, start=first.strength)
    assert len(calls) == 1 and again.strength == first.strength


def test_an_unreachable_target_stops_at_the_bound_and_says_so():
    m = match_kl(meter(1e-9), lambda s: s, 1.0, bounds=(1 / 64, 64.0))
    assert not m.matched and m.strength == 64.0 and m.evaluations <= 6


def test_a_patch_without_kl_leaves_the_control_at_its_strength():
    m = match_kl(meter(0.3), lambda s: s, 0.0)
    assert m.strength == 1.0 and m.evaluations == 1 and not m.matched
