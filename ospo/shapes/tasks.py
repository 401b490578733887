"""ShapesWorld training examples for every job the stages give the model, in their templates.

The tiny ShapesWorld Janus learns the stage jobs from these examples, asked with exactly the
strings :mod:`ospo.templates` builds for a real Janus-Pro and answered in the labelled-line
formats that :mod:`ospo.parsing` reads (there is no toy-only path: the stage code that asks
and parses is the same). Answers come from the world's grammar, so they are always right:

- ``prompts``   stage 1, :func:`ospo.templates.prompt_writing`: three new prompts of a
  sub-category, each followed by its objects;
- ``objects``   stage 1, :func:`ospo.templates.object_naming`;
- ``perturb``   stage 2, :func:`ospo.templates.perturbation`: replace / swap / drop, done on
  the scene (:func:`perturb_scene`) so that the result is a valid, different scene whose
  prompt passes :func:`ospo.parsing.check_perturbation`;
- ``dense``     stage 2, :func:`ospo.templates.densification`: the world has one detail that
  is always true and that both prompts can share, the white backdrop;
- ``decompose`` stage 4, :func:`ospo.templates.decomposition`: the grammar's questions.

Scenes of the held-out evaluation set never appear (``exclude``).
"""

from __future__ import annotations

import random
from collections import Counter

from ospo import templates
from ospo.shapes import grammar as gr
from ospo.shapes import world as w
from ospo.shapes.world import Group, Scene

TASKS = ("prompts", "objects", "perturb", "dense", "decompose")


def _valid(groups, relation) -> Scene | None:
    try:
        return Scene(tuple(groups), relation)
    except ValueError:
        return None


def _candidates(scene: Scene, op: str) -> list[Scene]:
    """Every scene one ``op`` away from ``scene`` whose prompt differs in the way
    :func:`ospo.parsing.check_perturbation` requires (swap: the same words; drop: fewer;
    replace: a new word) and whose meaning differs (a reordered list is not a swap)."""
    gs, rel, out = list(scene.groups), scene.relation, []

    def add(groups, relation):
        s = _valid(groups, relation)
        if s is not None and not same_meaning(s, scene) and s not in out:
            out.append(s)

    if op == "replace":
        for i, g in enumerate(gs):
            if g.color is not None:
                for c in w.COLORS:
                    if c != g.color:
                        add(gs[:i] + [Group(g.shape, g.count, c)] + gs[i + 1:], rel)
            for sh in w.SHAPES:
                if sh != g.shape:
                    add(gs[:i] + [Group(sh, g.count, g.color)] + gs[i + 1:], rel)
            for n in range(2, w.MAX_COUNT + 1):   # a new number word (one -> "a" adds none)
                if n != g.count:
                    add(gs[:i] + [Group(g.shape, n, g.color)] + gs[i + 1:], rel)
        if rel is not None:
            for r in w.RELATIONS:
                if r != rel:
                    add(gs, r)
    elif op == "swap":
        if rel is not None:
            add(gs[::-1], rel)                     # "A left of B" -> "B left of A"
        for i in range(len(gs)):
            for j in range(i + 1, len(gs)):
                a, b = gs[i], gs[j]
                if a.color is not None and b.color is not None and a.color != b.color:
                    new = list(gs)
                    new[i], new[j] = Group(a.shape, a.count, b.color), Group(b.shape, b.count, a.color)
                    add(new, rel)
                if a.shape != b.shape and a.count == b.count:
                    new = list(gs)
                    new[i], new[j] = Group(b.shape, a.count, a.color), Group(a.shape, b.count, b.color)
                    add(new, rel)
    elif op == "drop":
        if len(gs) > 1:
            for i in range(len(gs)):
                add(gs[:i] + gs[i + 1:], None)
        for i, g in enumerate(gs):
            if g.color is not None:
                add(gs[:i] + [Group(g.shape, g.count, None)] + gs[i + 1:], rel)
    else:
        raise ValueError(f"unknown operation {op!r}")
    return out


_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def same_meaning(a: Scene, b: Scene) -> bool:
    """Do two scenes ask for the same picture? A list is unordered ("a red circle and a red
    square" = "a red square and a red circle"); "A left of B" = "B right of A"."""
    if a.relation is None or b.relation is None:
        return a.relation is None and b.relation is None and Counter(a.groups) == Counter(b.groups)
    return a == b or (a.groups == b.groups[::-1] and a.relation == _INVERSE[b.relation])


def perturb_scene(scene: Scene, op: str, rng: random.Random) -> Scene | None:
    """One random ``op`` perturbation of the scene, or None when the scene has none."""
    c = _candidates(scene, op)
    return rng.choice(c) if c else None


def sample_scene(rng: random.Random, exclude: set[Scene] | frozenset = frozenset(), sub: str | None = None) -> tuple[str, Scene]:
    while True:
        s = sub or rng.choice(w.COVERED)
        scene = w.sample_scene(s, rng)
        if scene not in exclude:
            return s, scene


def _prompt_lines(scenes: list[Scene], rng: random.Random | None) -> str:
    return "\n".join(f"{templates.PROMPT_PREFIX} {gr.describe(s, rng)}\n{templates.OBJECTS_PREFIX} {', '.join(gr.objects(s))}"
                     for s in scenes)


def example(task: str, rng: random.Random, exclude: set[Scene] | frozenset = frozenset(),
            per_request: int = 3, shots: int = 3) -> tuple[str, str] | None:
    """(user text, answer) for one task, or None when the drawn scene does not allow it
    (e.g. nothing to drop from "two circles"). The answer starts with the format label the
    stage forces (``Prompt:``, ``Objects:``, ``Perturbed:``, ``Dense A:``, ``Q:``)."""
    if task == "prompts":
        sub = rng.choice(w.COVERED)
        scenes: list[Scene] = []
        while len(scenes) < shots + per_request:
            _, s = sample_scene(rng, exclude, sub)
            if s not in scenes:
                scenes.append(s)
        ex = [(gr.describe(s, rng), gr.objects(s)) for s in scenes[:shots]]
        return templates.prompt_writing(sub, ex, per_request), _prompt_lines(scenes[shots:], rng)
    _, scene = sample_scene(rng, exclude)
    if task == "objects":
        return templates.object_naming(gr.describe(scene, rng)), f"{templates.OBJECTS_PREFIX} {', '.join(gr.objects(scene))}"
    if task == "decompose":
        qs = [q["question"] for q in gr.questions(scene)]
        return templates.decomposition(gr.describe(scene, rng)), "\n".join(f"{templates.QUESTION_PREFIX} {q}" for q in qs)
    if task in ("perturb", "dense"):
        # Determiners stay "a" here: a swap must keep the prompt's words (check_perturbation).
        op = rng.choice(list(templates.OPERATIONS))
        other = perturb_scene(scene, op, rng)
        if other is None:
            return None
        a, b = gr.describe(scene), gr.describe(other)
        if task == "perturb":
            return templates.perturbation(op, a), f"{templates.PERTURBED_PREFIX} {b}"
        back = rng.choice(gr.BACKDROPS)
        return (templates.densification(a, b),
                f"{templates.DENSE_A_PREFIX} {a} {back}\n{templates.DENSE_B_LABEL} {b} {back}")
    raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Text of the world for the tokenizer: every task's question and answer, captions."""
    rng = random.Random(f"shapes-corpus:{seed}")
    out = []
    for i in range(n):
        ex = example(TASKS[i % len(TASKS)], rng)
        if ex is not None:
            out += list(ex)
    # yes/no answers, so that " yes" and " no" become single tokens (the answer position)
    out += [f"{templates.yes_no(q['question'])} {a}" for a in ("yes", "no")
            for q in gr.questions(sample_scene(rng)[1])] * 50
    for i in range(n // 4):
        _, s = sample_scene(rng)
        out += [gr.describe(s, rng)] + [q["question"] for q in gr.questions(s)]
    return out
