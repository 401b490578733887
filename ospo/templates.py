"""Every instruction and few-shot example the model sees, in one place.

Pure module: no model, no files. Stage code asks for a message here and parses the answer
with :mod:`ospo.parsing`; nothing else in the package writes prompt text.

The templates are deliberately short and line-oriented ("Prompt: ...", "Objects: ...")
so that (a) a real Janus-Pro follows them from a few examples, (b) a tiny model trained
in ShapesWorld can learn them within a CPU budget, and (c) parsing is a matter of
reading labelled lines. The same strings go to every model: there is no toy-only path.

The taxonomy follows OSPO sec. 3.3 (four categories, eight sub-categories). The seed
examples are ours.
"""

from __future__ import annotations

# OSPO sec. 3.3: four compositional categories and their sub-categories.
CATEGORIES: dict[str, list[str]] = {
    "attribute": ["color", "shape", "texture"],
    "layout": ["spatial_2d", "spatial_3d", "numeracy"],
    "non_spatial": ["non_spatial"],
    "complex": ["complex"],
}
SUB_CATEGORIES: list[str] = [s for subs in CATEGORIES.values() for s in subs]
CATEGORY_OF: dict[str, str] = {s: c for c, subs in CATEGORIES.items() for s in subs}

# What each sub-category asks for, in words the instruction uses.
DESCRIPTIONS: dict[str, str] = {
    "color": "objects with colors",
    "shape": "objects with shapes",
    "texture": "objects with textures or materials",
    "spatial_2d": "two objects and where one is (left, right, above, below) of the other",
    "spatial_3d": "two objects and which is in front of or behind the other",
    "numeracy": "a number of objects",
    "non_spatial": "objects doing something with each other",
    "complex": "several objects with attributes, counts and relations",
}

# Seed few-shot examples (ours), (prompt, objects). Objects are the nouns as written.
SEED_EXAMPLES: dict[str, list[tuple[str, list[str]]]] = {
    "color": [
        ("a red apple and a green cup", ["apple", "cup"]),
        ("a yellow bus next to a blue car", ["bus", "car"]),
        ("a black cat on a white sofa", ["cat", "sofa"]),
    ],
    "shape": [
        ("a round clock and a square frame", ["clock", "frame"]),
        ("a triangular sign above a rectangular door", ["sign", "door"]),
        ("an oval mirror and a square table", ["mirror", "table"]),
    ],
    "texture": [
        ("a wooden chair and a metal bucket", ["chair", "bucket"]),
        ("a furry dog on a leather couch", ["dog", "couch"]),
        ("a glass vase and a plastic bottle", ["vase", "bottle"]),
    ],
    "spatial_2d": [
        ("a dog to the left of a bench", ["dog", "bench"]),
        ("a lamp above a desk", ["lamp", "desk"]),
        ("a bicycle to the right of a tree", ["bicycle", "tree"]),
    ],
    "spatial_3d": [
        ("a car in front of a house", ["car", "house"]),
        ("a horse behind a fence", ["horse", "fence"]),
        ("a vase in front of a mirror", ["vase", "mirror"]),
    ],
    "numeracy": [
        ("three apples on a plate", ["apples", "plate"]),
        ("two cats and one dog", ["cats", "dog"]),
        ("four birds on a wire", ["birds", "wire"]),
    ],
    "non_spatial": [
        ("a man reading a book", ["man", "book"]),
        ("a girl feeding a horse", ["girl", "horse"]),
        ("a dog chasing a ball", ["dog", "ball"]),
    ],
    "complex": [
        ("two red apples to the left of a blue cup", ["apples", "cup"]),
        ("a wooden table with three green bottles on it", ["table", "bottles"]),
        ("a black dog chasing a white cat behind a fence", ["dog", "cat", "fence"]),
    ],
}


# --- Stage 1: base prompts -------------------------------------------------------------

def prompt_writing(sub_category: str, examples: list[tuple[str, list[str]]], n: int) -> str:
    """Ask for n new prompts of a sub-category, each with its objects, in labelled lines."""
    shots = "\n".join(f"Prompt: {p}\nObjects: {', '.join(o)}" for p, o in examples)
    return (
        f"Write {n} new image prompts about {DESCRIPTIONS[sub_category]}. "
        f"After each prompt list its objects.\n{shots}"
    )


# The answer starts with this label: it fixes the format, never the content.
PROMPT_PREFIX = "Prompt:"


def object_naming(prompt: str) -> str:
    """Ask for the object nouns of a user-supplied prompt."""
    return (
        "List the objects in the prompt, as written, separated by commas.\n"
        "Prompt: a red apple and two green cups\nObjects: apple, cups\n"
        f"Prompt: {prompt}"
    )


OBJECTS_PREFIX = "Objects:"


# --- Stage 2: perturbation and densification (OSPO sec. 3.4) -----------------------------

OPERATIONS: dict[str, str] = {
    "replace": "Replace one object or attribute with a different one",
    "swap": "Swap two objects or two attributes",
    "drop": "Remove one object or attribute",
}

PERTURB_EXAMPLES: dict[str, tuple[str, str]] = {
    "replace": ("a red apple and a green cup", "a red apple and a blue cup"),
    "swap": ("a dog to the left of a bench", "a bench to the left of a dog"),
    "drop": ("two cats and one dog", "two cats"),
}

# Which operation fills slot k, per sub-category (OSPO sec. 3.4 lets the schedule depend on
# the sub-category). Cycled when num_variants exceeds the list. Numeracy favours replace
# (a different count); spatial favours swap (exchange the positions).
OP_SCHEDULE: dict[str, list[str]] = {
    "color": ["replace", "swap", "drop"],
    "shape": ["replace", "swap", "drop"],
    "texture": ["replace", "swap", "drop"],
    "spatial_2d": ["swap", "replace", "drop"],
    "spatial_3d": ["swap", "replace", "drop"],
    "numeracy": ["replace", "replace", "drop"],
    "non_spatial": ["replace", "swap", "drop"],
    "complex": ["replace", "swap", "drop"],
}


def schedule(sub_category: str, n: int) -> list[str]:
    ops = OP_SCHEDULE.get(sub_category, ["replace", "swap", "drop"])
    return [ops[k % len(ops)] for k in range(n)]


def perturbation(op: str, prompt: str) -> str:
    src, dst = PERTURB_EXAMPLES[op]
    return f"{OPERATIONS[op]}.\nPrompt: {src}\nPerturbed: {dst}\nPrompt: {prompt}"


PERTURBED_PREFIX = "Perturbed:"


def densification(prompt: str, perturbed: str) -> str:
    """Joint densification: the same scene details added to both prompts (OSPO sec. 3.4)."""
    return (
        "Add the same scene details to both prompts. Keep their difference.\n"
        "A: a red apple and a green cup\nB: a red apple and a blue cup\n"
        "Dense A: a red apple and a green cup on a wooden table in a bright kitchen\n"
        "Dense B: a red apple and a blue cup on a wooden table in a bright kitchen\n"
        f"A: {prompt}\nB: {perturbed}"
    )


DENSE_A_PREFIX = "Dense A:"
DENSE_B_LABEL = "Dense B:"


# --- Stage 4: decomposition and yes/no answering (OSPO sec. 3.6) -------------------------

def decomposition(prompt: str) -> str:
    return (
        "Write yes/no questions that check the prompt, one object, attribute, relation "
        "or count each.\n"
        "Prompt: two red apples to the left of a cup\n"
        "Q: Are there apples?\nQ: Are the apples red?\nQ: Are there two apples?\n"
        "Q: Is there a cup?\nQ: Are the apples to the left of the cup?\n"
        f"Prompt: {prompt}"
    )


QUESTION_PREFIX = "Q:"


def yes_no(question: str) -> str:
    """The text that follows the image in a yes/no query."""
    return f"{question} Answer yes or no."


YES_WORDS = ("yes", "Yes", " yes", " Yes")
NO_WORDS = ("no", "No", " no", " No")


def corpus_lines() -> list[str]:
    """Every fixed string above, for a tokenizer trained in-process (ospo.tiny)."""
    lines = [prompt_writing(s, SEED_EXAMPLES[s], 3) for s in SUB_CATEGORIES]
    lines += [perturbation(op, "a cat") for op in OPERATIONS]
    lines += [densification("a cat", "a dog"), decomposition("a cat"), object_naming("a cat"), yes_no("Is it?")]
    return lines
