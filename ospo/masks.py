"""Object masks: object words -> token spans; soft attention maps -> Otsu -> union (OSPO sec. 3.5.2).

Pure numpy (plus ``skimage.filters.threshold_otsu``); no model, no files. The tokenizer is
taken as an argument and only used to decode ids.

Conventions (design.md "run directory"):

- Spans are ``[start, end)`` token index pairs into the unpadded ``input_ids`` (chat template
  applied, ending with ``<begin_of_image>``), one list per object; an object not found has an
  empty list.
- An object word matches whole words only, case-insensitively, every occurrence ("dog" does
  not match "dogs" or "hotdog"); it may cover several tokens and be tokenized with or without
  a leading space: matching is done on the decoded text and every token whose characters
  overlap a match belongs to the span. Characters of special tokens (``<|User|>``, BOS, BOI)
  are blanked first, so an object "user" never matches inside ``<|User|>``.
- Maps and masks are ``grid x grid``, row-major in generation order (token t is row
  ``t // grid``, column ``t % grid``).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

NO_OBJECT_FOUND = "no_object_found"


# --- object word -> token spans ---------------------------------------------------------------

def token_char_ends(input_ids: Sequence[int], tokenizer) -> tuple[str, list[int], list[int]]:
    """Decoded text of ``input_ids`` and, per token, the end (exclusive) of its characters.

    Ends come from decoding growing prefixes, so a byte-level token holding half of a
    multi-byte character is handled (its characters land on the token that completes them).
    Also returns the token indices that are special tokens.
    """
    ids = [int(t) for t in input_ids]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special |= {int(i) for i in added}
    ends: list[int] = []
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        ends.append(len(text))
    full = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) if ids else ""
    return full, ends, [i for i, t in enumerate(ids) if t in special]


def word_spans(text: str, ends: Sequence[int], word: str, blank_tokens: Sequence[int] = ()) -> list[list[int]]:
    """Token spans ``[start, end)`` of every whole-word, case-insensitive occurrence of ``word``.

    ``ends[i]`` is the exclusive character end of token i in ``text`` (non-decreasing);
    token i covers ``[ends[i-1], ends[i])``. Tokens in ``blank_tokens`` are blanked
    (special tokens). A multi-word object ("traffic light") matches any whitespace between.
    """
    word = word.strip()
    if not word:
        return []
    chars = list(text)
    starts = [0] + list(ends[:-1])
    for i in blank_tokens:
        for c in range(starts[i], min(ends[i], len(chars))):
            chars[c] = " "
    clean = "".join(chars)
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in word.split()) + r"(?!\w)"
    out: list[list[int]] = []
    for m in re.finditer(pattern, clean, flags=re.IGNORECASE):
        a, b = m.start(), m.end()
        toks = [i for i in range(len(ends)) if starts[i] < b and ends[i] > a and ends[i] > starts[i]]
        if toks:
            span = [toks[0], toks[-1] + 1]
            if span not in out:
                out.append(span)
    return out


def find_object_spans(input_ids: Sequence[int], objects: Sequence[str], tokenizer) -> list[list[list[int]]]:
    """Per object, the token spans of its every occurrence in ``input_ids`` ([] when absent)."""
    text, ends, special = token_char_ends(input_ids, tokenizer)
    return [word_spans(text, ends, obj, special) for obj in objects]


def span_columns(spans: Sequence[Sequence[int]]) -> list[int]:
    """Token indices covered by an object's spans (each token once, in order)."""
    cols: list[int] = []
    for a, b in spans:
        cols += [c for c in range(int(a), int(b)) if c not in cols]
    return cols


# --- soft maps -> binary masks ----------------------------------------------------------------

def otsu_mask(soft_map: np.ndarray) -> np.ndarray:
    """Binary map ``soft_map > threshold_otsu(soft_map)``; a constant (or non-finite) map has
    no foreground and gives an all-False mask instead of an error."""
    from skimage.filters import threshold_otsu

    m = np.asarray(soft_map, dtype=np.float64)
    if m.size == 0 or not np.all(np.isfinite(m)) or float(m.max() - m.min()) <= 0.0:
        return np.zeros(m.shape, dtype=bool)
    return m > threshold_otsu(m)


def union_mask(binary_maps: Sequence[np.ndarray | None], grid: int) -> np.ndarray:
    """Union (logical or) of the per-object binary maps; objects given as None are skipped.
    No map at all gives an all-zero ``grid x grid`` mask."""
    out = np.zeros((grid, grid), dtype=bool)
    for b in binary_maps:
        if b is not None:
            out |= np.asarray(b, dtype=bool).reshape(grid, grid)
    return out


def image_mask(soft_maps: Sequence[np.ndarray | None], objects: Sequence[str], grid: int) -> tuple[np.ndarray, str | None, list[str]]:
    """The image's mask M from its per-object soft maps (None for an object not found).

    Returns ``(mask uint8 grid x grid, note, missing)``: ``missing`` names the objects without a
    map; ``note`` is None when every object was found, ``no_object_found`` when none was
    (the mask is then empty), else ``missing_objects: a, b``.
    """
    binaries = [None if m is None else otsu_mask(np.asarray(m).reshape(grid, grid)) for m in soft_maps]
    missing = [o for o, m in zip(objects, soft_maps) if m is None]
    if not objects or len(missing) == len(objects):
        note = NO_OBJECT_FOUND
    elif missing:
        note = "missing_objects: " + ", ".join(missing)
    else:
        note = None
    return union_mask(binaries, grid).astype(np.uint8), note, missing
