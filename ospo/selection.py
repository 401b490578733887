"""Pair filtering and selection (OSPO sec. 3.6). Pure: numbers in, decisions out.

A candidate pair k of a prompt is (y_w, y_l): the image of the dense original prompt
(chosen) and the image of the dense perturbed prompt (rejected). With s_j(y) =
p(yes) - p(no) for question j and S(y) = mean_j s_j(y):

- rule ``min_chosen_score``: drop pair k if S(y_w) < tau (tau = 0.6 in the paper). S
  exactly equal to tau is kept. A non-finite S (NaN) is dropped too.
- rule ``drop_all_true_rejected``: drop pair k if s_j(y_l) > 0 for EVERY question j: the
  rejected image satisfies the whole prompt, so the pair does not encode a preference.
- selection among the survivors: ``best`` keeps the pair whose y_w has the highest S
  (ties: lowest k); ``random`` keeps one survivor drawn with the given seed (the stage
  passes ``derive_seed(run seed, "select", id)``); ``all`` keeps every survivor.
  A prompt with no survivor keeps nothing (the stage drops it).

``filter=False`` turns both rules off (the ablation); each rule has its own switch too.

Counting (:func:`removal_counts`): a pair is checked against every enabled rule, not only
until the first one fails. A pair failing both rules is counted under EACH rule and also
under ``both``; so ``min_chosen_score + drop_all_true_rejected - both`` is the number of
distinct pairs removed by the rules. (Counting it under one rule only would make the
per-rule numbers depend on the order the rules are checked in.)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Iterable, Sequence

MIN_CHOSEN = "min_chosen_score"
ALL_TRUE = "drop_all_true_rejected"
RULES = (MIN_CHOSEN, ALL_TRUE)
SELECT_MODES = ("best", "random", "all")


@dataclass(frozen=True)
class PairScores:
    """What the rules look at for pair k: S(y_w) and the per-question s_j(y_l)."""

    k: int
    S_chosen: float
    s_rejected: Sequence[float]


@dataclass
class Selection:
    """The decision for one prompt.

    ``kept``: the k's kept, in ascending order (best/random: at most one).
    ``removed``: k -> the rules that removed it (only pairs some rule removed).
    ``survivors``: k's that passed the rules, ascending (kept is a subset).
    """

    kept: list[int]
    removed: dict[int, list[str]] = field(default_factory=dict)
    survivors: list[int] = field(default_factory=list)

    def status(self, k: int) -> str:
        """``kept``, ``filtered`` (a rule removed it) or ``not_selected`` (survived, not chosen)."""
        if k in self.kept:
            return "kept"
        return "filtered" if k in self.removed else "not_selected"


def failed_rules(pair: PairScores, *, tau: float, filter: bool = True, min_chosen_score: bool = True,
                 drop_all_true_rejected: bool = True) -> list[str]:
    """The enabled rules pair fails (all of them, in :data:`RULES` order)."""
    if not pair.s_rejected:
        raise ValueError(f"pair k={pair.k}: no per-question scores for the rejected image")
    if not filter:
        return []
    out = []
    if min_chosen_score and not (pair.S_chosen >= tau):  # NaN fails too
        out.append(MIN_CHOSEN)
    if drop_all_true_rejected and all(s > 0 for s in pair.s_rejected):
        out.append(ALL_TRUE)
    return out


def select_pairs(pairs: Iterable[PairScores], *, tau: float, filter: bool = True, min_chosen_score: bool = True,
                 drop_all_true_rejected: bool = True, select: str = "best", seed: int | None = None) -> Selection:
    """Apply the rules to a prompt's candidate pairs, then select among the survivors."""
    if select not in SELECT_MODES:
        raise ValueError(f"select must be one of {SELECT_MODES}, got {select!r}")
    pairs = sorted(pairs, key=lambda p: p.k)
    ks = [p.k for p in pairs]
    if len(set(ks)) != len(ks):
        raise ValueError(f"duplicate pair indices k in {ks}")
    removed: dict[int, list[str]] = {}
    survivors: list[PairScores] = []
    for p in pairs:
        rules = failed_rules(p, tau=tau, filter=filter, min_chosen_score=min_chosen_score,
                             drop_all_true_rejected=drop_all_true_rejected)
        if rules:
            removed[p.k] = rules
        else:
            survivors.append(p)
    if not survivors:
        kept: list[int] = []
    elif select == "all":
        kept = [p.k for p in survivors]
    elif select == "random":
        if seed is None:
            raise ValueError("select='random' needs a seed")
        kept = [random.Random(seed).choice(survivors).k]
    else:
        def rank(p: PairScores):
            s = p.S_chosen if not math.isnan(p.S_chosen) else -math.inf
            return (-s, p.k)  # highest S first, then lowest k

        kept = [min(survivors, key=rank).k]
    return Selection(kept=kept, removed=removed, survivors=[p.k for p in survivors])


def select_with_config(pairs: Iterable[PairScores], vqa_cfg, *, seed: int | None = None) -> Selection:
    """:func:`select_pairs` with the switches of a :class:`ospo.config.VqaConfig`."""
    return select_pairs(pairs, tau=vqa_cfg.tau, filter=vqa_cfg.filter, min_chosen_score=vqa_cfg.min_chosen_score,
                        drop_all_true_rejected=vqa_cfg.drop_all_true_rejected, select=vqa_cfg.select, seed=seed)


def removal_counts(removed: Iterable[Sequence[str]]) -> dict[str, int]:
    """Pairs removed per rule, from each removed pair's rule list, plus ``both``.

    A pair that failed both rules adds 1 to each rule and 1 to ``both``.
    """
    out = {MIN_CHOSEN: 0, ALL_TRUE: 0, "both": 0}
    for rules in removed:
        for r in rules:
            out[r] += 1
        if len(rules) > 1:
            out["both"] += 1
    return out
