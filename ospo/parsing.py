"""Turning model text into records, or into a named reason for rejecting it.

Pure module: strings in, values and reasons out. Every parser returns either a value
or ``(None, reason)``; it never raises on model output. Reasons are short snake_case
strings counted in the stage manifests.

Formats are those the templates ask for (see :mod:`ospo.templates`): labelled lines such
as ``Prompt: ...`` / ``Objects: a, b``.
"""

from __future__ import annotations

import re
from collections import Counter

_WS = re.compile(r"\s+")
_WORD = re.compile(r"[A-Za-z0-9']+")


def normalize(text: str) -> str:
    """Lowercase, single spaces, no trailing punctuation: the dedupe key of a prompt."""
    return _WS.sub(" ", text.strip().lower()).strip(" .!;,")


def clean_line(text: str) -> str:
    """One prompt line: strip quotes, bullets, surrounding spaces and a trailing period."""
    t = text.strip().strip('"').strip("'").strip()
    t = re.sub(r"^[-*\d.)\s]+(?=[A-Za-z])", "", t)
    return _WS.sub(" ", t).rstrip(" .")


def word_pattern(word: str) -> re.Pattern:
    """Whole-word, case-insensitive match of a (possibly multi-word) object phrase."""
    parts = [re.escape(p) for p in word.split()]
    return re.compile(r"(?<![A-Za-z0-9])" + r"\s+".join(parts) + r"(?![A-Za-z0-9])", re.IGNORECASE)


def has_word(text: str, word: str) -> bool:
    return bool(word.strip()) and word_pattern(word).search(text) is not None


def word_spans(text: str, word: str) -> list[tuple[int, int]]:
    """Character spans of every whole-word, case-insensitive occurrence of word in text."""
    if not word.strip():
        return []
    return [m.span() for m in word_pattern(word).finditer(text)]


def _label_value(line: str, label: str) -> str | None:
    """The text after ``label`` at the start of a line (case-insensitive), else None."""
    s = line.strip()
    if s.lower().startswith(label.lower()):
        return s[len(label):].strip()
    return None


def split_objects(text: str) -> list[str]:
    objs = [clean_line(o) for o in re.split(r",|;|\band\b", text)]
    seen, out = set(), []
    for o in objs:
        if o and o.lower() not in seen:
            seen.add(o.lower())
            out.append(o)
    return out


def validate_objects(prompt: str, objects: list[str], max_objects: int) -> str | None:
    """Reason the objects are unusable for this prompt, or None when they are fine."""
    if not objects:
        return "missing_objects"
    if len(objects) > max_objects:
        return "too_many_objects"
    if any(not has_word(prompt, o) for o in objects):
        return "object_not_in_prompt"
    return None


# --- Stage 1 ------------------------------------------------------------------------------

def parse_prompt_list(text: str, *, max_objects: int = 6) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """Parse ``Prompt: ...`` / ``Objects: ...`` pairs. Returns (accepted, reject reasons).

    A prompt line without a following objects line is rejected (``missing_objects``); an
    answer with no prompt line at all yields the single reason ``no_prompt_found``.
    """
    accepted: list[tuple[str, list[str]]] = []
    reasons: list[str] = []
    current: str | None = None
    for line in text.splitlines():
        p = _label_value(line, "Prompt:")
        if p is not None:
            if current is not None:
                reasons.append("missing_objects")
            current = clean_line(p)
            if not current:
                reasons.append("empty_prompt")
                current = None
            continue
        o = _label_value(line, "Objects:")
        if o is not None and current is not None:
            objs = split_objects(o)
            why = validate_objects(current, objs, max_objects)
            if why:
                reasons.append(why)
            else:
                accepted.append((current, objs))
            current = None
    if current is not None:
        reasons.append("missing_objects")
    if not accepted and not reasons:
        reasons.append("no_prompt_found")
    return accepted, reasons


def parse_objects(text: str, prompt: str, *, max_objects: int = 6) -> tuple[list[str] | None, str | None]:
    """Objects named for a user prompt: the first ``Objects:`` line (the label may be forced)."""
    for line in text.splitlines():
        o = _label_value(line, "Objects:")
        if o is not None:
            objs = split_objects(o)
            why = validate_objects(prompt, objs, max_objects)
            return (None, why) if why else (objs, None)
    return None, "no_objects_found"


# --- Stage 2 ------------------------------------------------------------------------------

def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def check_perturbation(original: str, perturbed: str, op: str) -> str | None:
    """Reason a perturbation is unusable, or None. Checks what each operation must do."""
    if not perturbed:
        return "empty_perturbation"
    if normalize(perturbed) == normalize(original):
        return "same_as_original"
    a, b = _words(original), _words(perturbed)
    if op == "swap" and sorted(a) != sorted(b):
        return "swap_changed_words"  # a swap exchanges words, it adds or removes none
    if op == "drop" and len(b) >= len(a):
        return "drop_not_shorter"
    if op == "replace" and not (Counter(b) - Counter(a)):
        return "replace_added_nothing"  # a replacement brings in a word (or one more of it)
    return None


def parse_perturbation(text: str, original: str, op: str) -> tuple[str | None, str | None]:
    for line in text.splitlines():
        v = _label_value(line, "Perturbed:")
        if v is not None:
            p = clean_line(v)
            why = check_perturbation(original, p, op)
            return (None, why) if why else (p, None)
    return None, "no_perturbation_found"


def check_dense(prompt: str, perturbed: str, dense: str, perturbed_dense: str, objects: list[str]) -> str | None:
    if not dense or not perturbed_dense:
        return "empty_dense"
    if normalize(dense) == normalize(perturbed_dense):
        return "dense_erased_difference"
    if any(not has_word(dense, o) for o in objects):
        return "dense_lost_object"
    return None


def parse_dense(text: str, prompt: str, perturbed: str, objects: list[str]) -> tuple[tuple[str, str] | None, str | None]:
    """Parse ``Dense A: ...`` and ``Dense B: ...`` lines of a joint densification."""
    a = b = None
    for line in text.splitlines():
        va, vb = _label_value(line, "Dense A:"), _label_value(line, "Dense B:")
        if va is not None and a is None:
            a = clean_line(va)
        elif vb is not None and b is None:
            b = clean_line(vb)
    if a is None:
        return None, "no_dense_a"
    if b is None:
        return None, "no_dense_b"
    why = check_dense(prompt, perturbed, a, b, objects)
    return (None, why) if why else ((a, b), None)


# --- Stage 4 ------------------------------------------------------------------------------

def parse_questions(text: str, *, min_questions: int, max_questions: int) -> tuple[list[str] | None, str | None]:
    """Parse ``Q: ...?`` lines into deduplicated yes/no questions within the bounds."""
    qs: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        v = _label_value(line, "Q:")
        if v is None:
            continue
        q = _WS.sub(" ", v.strip())
        if not q.endswith("?") or len(_words(q)) < 2:
            continue
        key = normalize(q)
        if key not in seen:
            seen.add(key)
            qs.append(q)
    if not qs:
        return None, "no_questions_found"
    if len(qs) < min_questions:
        return None, "too_few_questions"
    if len(qs) > max_questions:
        return None, "too_many_questions"
    return qs, None
