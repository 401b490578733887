"""Pair filtering and selection (OSPO sec. 3.6) on hand-made score tables.

Notation: pair k has S_w = S(y_w) and s_l = [s_1(y_l), ..., s_J(y_l)]. Rule 1
(``min_chosen_score``) drops k when S_w < tau; rule 2 (``drop_all_true_rejected``) drops k
when every s_j(y_l) > 0. ``best`` keeps the survivor with the highest S_w, ties to the
lowest k.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from ospo.selection import ALL_TRUE, MIN_CHOSEN, PairScores, removal_counts, select_pairs, select_with_config

P = PairScores


def table():
    """tau = 0.6:
    k=0: S_w 0.70, s_l [ 0.2, -0.1]  -> 0.70 >= 0.6, not all s_l > 0        -> survives
    k=1: S_w 0.90, s_l [ 0.3,  0.4]  -> 0.90 >= 0.6, all s_l > 0            -> rule 2
    k=2: S_w 0.50, s_l [-0.2,  0.1]  -> 0.50 <  0.6                         -> rule 1
    k=3: S_w 0.40, s_l [ 0.1,  0.2]  -> 0.40 <  0.6 and all s_l > 0         -> rules 1 and 2
    k=4: S_w 0.80, s_l [ 0.0,  0.5]  -> 0.80 >= 0.6, s_1 = 0 is not > 0     -> survives
    """
    return [P(0, 0.7, [0.2, -0.1]), P(1, 0.9, [0.3, 0.4]), P(2, 0.5, [-0.2, 0.1]),
            P(3, 0.4, [0.1, 0.2]), P(4, 0.8, [0.0, 0.5])]


def test_rules_and_best():
    """Survivors {0 (S_w 0.7), 4 (S_w 0.8)}: best = 4 (0.8 > 0.7). k=1 has the highest S_w
    overall (0.9) but its rejected image answers yes to everything, so it is not kept."""
    sel = select_pairs(table(), tau=0.6)
    assert sel.survivors == [0, 4]
    assert sel.kept == [4]
    assert sel.removed == {1: [ALL_TRUE], 2: [MIN_CHOSEN], 3: [MIN_CHOSEN, ALL_TRUE]}
    assert [sel.status(k) for k in range(5)] == ["not_selected", "filtered", "filtered", "filtered", "kept"]


def test_removal_counts_count_a_double_failure_under_both_rules():
    """Removed: k=1 [rule 2], k=2 [rule 1], k=3 [rule 1, rule 2] ->
    rule 1: 2 (k=2, k=3), rule 2: 2 (k=1, k=3), both: 1 (k=3); distinct pairs = 2 + 2 - 1 = 3."""
    sel = select_pairs(table(), tau=0.6)
    c = removal_counts(sel.removed.values())
    assert c == {MIN_CHOSEN: 2, ALL_TRUE: 2, "both": 1}
    assert c[MIN_CHOSEN] + c[ALL_TRUE] - c["both"] == len(sel.removed) == 3


def test_tau_edge_equal_is_kept():
    """S_w = tau exactly: the rule is S_w < tau, and 0.6 < 0.6 is false -> kept.
    A hair below (0.6 - 1e-12 < 0.6) is dropped."""
    s = [0.2, -0.2]
    assert select_pairs([P(0, 0.6, s)], tau=0.6).kept == [0]
    sel = select_pairs([P(0, 0.6 - 1e-12, s)], tau=0.6)
    assert sel.kept == [] and sel.removed == {0: [MIN_CHOSEN]}
    # tau = -1 (the smallest possible S) keeps every S_w; tau = 1 keeps only S_w = 1
    assert select_pairs([P(0, -1.0, s)], tau=-1.0).kept == [0]
    assert select_pairs([P(0, 1.0, s), P(1, 0.999, s)], tau=1.0).survivors == [0]


def test_ties_go_to_lowest_k():
    """S_w: k=2 -> 0.8, k=0 -> 0.8, k=1 -> 0.7; the two 0.8's tie -> lowest k = 0, whatever
    the input order."""
    s = [-0.1, 0.3]
    pairs = [P(2, 0.8, s), P(1, 0.7, s), P(0, 0.8, s)]
    assert select_pairs(pairs, tau=0.6).kept == [0]
    assert select_pairs(list(reversed(pairs)), tau=0.6).kept == [0]


def test_all_filtered_and_single_survivor():
    """All filtered: k=0 S_w 0.1 < 0.6 (rule 1), k=1 s_l all > 0 (rule 2) -> nothing kept,
    in every select mode. Single survivor: only k=1 (S_w 0.65 >= 0.6, s_l has -0.3) survives;
    best, random and all keep exactly it."""
    dead = [P(0, 0.1, [-0.5, -0.5]), P(1, 0.9, [0.01, 0.02])]
    for mode in ("best", "random", "all"):
        sel = select_pairs(dead, tau=0.6, select=mode, seed=1)
        assert sel.kept == [] and sel.survivors == [] and set(sel.removed) == {0, 1}
    one = [P(0, 0.3, [-0.5]), P(1, 0.65, [-0.3]), P(2, 0.95, [0.4])]
    for mode in ("best", "random", "all"):
        assert select_pairs(one, tau=0.6, select=mode, seed=7).kept == [1]


def test_rule_switches():
    """Same table, tau 0.6:
    filter off            -> no rule; best over all 5 = k=1 (S_w 0.9).
    only rule 1           -> drop k=2 (0.5), k=3 (0.4); survivors 0, 1, 4; best = k=1 (0.9).
    only rule 2           -> drop k=1, k=3 (all s_l > 0); survivors 0, 2, 4; best = k=4 (0.8).
    both rules            -> survivors 0, 4; best = k=4.
    """
    t = table()
    off = select_pairs(t, tau=0.6, filter=False)
    assert off.removed == {} and off.survivors == [0, 1, 2, 3, 4] and off.kept == [1]
    r1 = select_pairs(t, tau=0.6, drop_all_true_rejected=False)
    assert r1.removed == {2: [MIN_CHOSEN], 3: [MIN_CHOSEN]} and r1.kept == [1]
    r2 = select_pairs(t, tau=0.6, min_chosen_score=False)
    assert r2.removed == {1: [ALL_TRUE], 3: [ALL_TRUE]} and r2.kept == [4]
    none = select_pairs(t, tau=0.6, min_chosen_score=False, drop_all_true_rejected=False)
    assert none.removed == {} and none.kept == [1]


def test_select_all_and_random():
    """all: every survivor, ascending k -> [0, 4]. random: one survivor, the same one for the
    same seed, and over seeds 0..39 both survivors get drawn (a 2-way uniform draw picks only
    one of them 40 times with probability 2 * 0.5**40)."""
    t = table()
    assert select_pairs(t, tau=0.6, select="all").kept == [0, 4]
    picks = [select_pairs(t, tau=0.6, select="random", seed=s).kept for s in range(40)]
    assert all(p in ([0], [4]) for p in picks)
    assert {p[0] for p in picks} == {0, 4}
    assert select_pairs(t, tau=0.6, select="random", seed=3).kept == picks[3]
    with pytest.raises(ValueError, match="seed"):
        select_pairs(t, tau=0.6, select="random")
    with pytest.raises(ValueError):
        select_pairs(t, tau=0.6, select="worst")


def test_nan_score_never_survives_rule_1_and_never_wins():
    """NaN >= tau is false -> rule 1 removes it; with the filter off it ranks below every
    real S_w (k=1, S_w -0.9, wins)."""
    pairs = [P(0, math.nan, [-0.1]), P(1, -0.9, [-0.1])]
    assert select_pairs(pairs, tau=-1.0).removed == {0: [MIN_CHOSEN]}
    assert select_pairs(pairs, tau=0.6, filter=False).kept == [1]


def test_config_switches_are_read():
    """select_with_config passes tau, filter, both rule switches and select through: tau 0.75
    drops k=0 (0.7) too, leaving k=4 (0.8) only; with select=all and rule 2 off, survivors
    with S_w >= 0.75 are k=1 (0.9) and k=4 (0.8)."""
    cfg = SimpleNamespace(tau=0.75, filter=True, min_chosen_score=True, drop_all_true_rejected=True, select="best")
    assert select_with_config(table(), cfg).kept == [4]
    cfg.drop_all_true_rejected, cfg.select = False, "all"
    assert select_with_config(table(), cfg).kept == [1, 4]
    cfg.filter = False
    assert select_with_config(table(), cfg).kept == [0, 1, 2, 3, 4]


def test_bad_input():
    with pytest.raises(ValueError, match="duplicate"):
        select_pairs([P(0, 0.7, [0.1]), P(0, 0.8, [0.1])], tau=0.6)
    with pytest.raises(ValueError, match="no per-question"):
        select_pairs([P(0, 0.7, [])], tau=0.6)
