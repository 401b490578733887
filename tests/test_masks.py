"""ospo.masks: object spans in token ids, Otsu masks, union, missing objects (no model)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.filters import threshold_otsu

from ospo import masks


@pytest.fixture(scope="module")
def tok():
    from ospo.tiny import build_tokenizer

    return build_tokenizer()


def _chat_ids(tok, text):
    from ospo.tiny import BOI, CHAT_TEMPLATE  # noqa: F401 - the same format the engine uses

    ids = tok(f"<|User|>: {text}\n\n<|Assistant|>:")["input_ids"]
    return list(ids) + [tok.convert_tokens_to_ids(BOI)]


def _text_of(tok, ids, span):
    return tok.decode(ids[span[0]:span[1]]).strip()


def test_spans_whole_word_case_insensitive_every_occurrence(tok):
    ids = _chat_ids(tok, "A Dog and a dog, dogs and a hotdog near the dog.")
    spans = masks.find_object_spans(ids, ["dog"], tok)[0]
    assert len(spans) == 3  # "Dog", "dog,", "dog." but not "dogs" nor "hotdog"
    assert [_text_of(tok, ids, s).lower() for s in spans] == ["dog"] * 3
    # with and without a leading space: the first word after ": " and one after a newline
    ids2 = _chat_ids(tok, "bench\nbench bench")
    assert len(masks.find_object_spans(ids2, ["bench"], tok)[0]) == 3


def test_spans_multi_token_words_and_phrases(tok):
    ids = _chat_ids(tok, "a xylophonez next to a traffic  light")
    (xylo, traffic, missing) = masks.find_object_spans(ids, ["xylophonez", "traffic light", "cat"], tok)
    assert len(xylo) == 1 and xylo[0][1] - xylo[0][0] > 1  # an unseen word: several BPE tokens
    assert _text_of(tok, ids, xylo[0]) == "xylophonez"
    assert len(traffic) == 1 and _text_of(tok, ids, traffic[0]).split() == ["traffic", "light"]
    assert missing == []


def test_special_tokens_never_match(tok):
    ids = _chat_ids(tok, "a user and an assistant")
    spans = masks.find_object_spans(ids, ["user", "assistant"], tok)
    assert [len(s) for s in spans] == [1, 1]  # not inside <|User|> / <|Assistant|>
    assert all(s[0][0] > 1 for s in spans)


def test_word_spans_pure():
    # tokens: "a", " big", "dog", " dog", "s"  (ends are exclusive char offsets)
    text = "a bigdog dogs"
    ends = [1, 5, 8, 12, 13]
    assert masks.word_spans(text, ends, "dog") == []  # "bigdog", "dogs": not whole words
    assert masks.word_spans(text, ends, "bigdog") == [[1, 3]]
    assert masks.word_spans(text, ends, "DOGS") == [[3, 5]]
    assert masks.span_columns([[1, 3], [2, 4], [7, 8]]) == [1, 2, 3, 7]


def test_otsu_equals_skimage_and_edge_cases():
    rng = np.random.RandomState(0)
    m = rng.rand(8, 8) * 0.1
    m[2:5, 3:6] += 1.0
    got = masks.otsu_mask(m)
    np.testing.assert_array_equal(got, m > threshold_otsu(m))
    assert got[2:5, 3:6].all() and got.sum() < 12
    clean = np.zeros((8, 8))
    clean[1:3, 1:4] = 0.5 + rng.rand(2, 3) * 0.1
    assert masks.otsu_mask(clean).sum() == 6
    assert not masks.otsu_mask(np.full((4, 4), 0.3)).any()  # constant map: empty, no crash
    assert not masks.otsu_mask(np.full((4, 4), np.nan)).any()


def test_union_and_missing_objects():
    a = np.zeros((4, 4))
    a[0, 0] = 1
    b = np.zeros((4, 4))
    b[3, 3] = 1
    mask, note, missing = masks.image_mask([a.ravel(), b.ravel()], ["cat", "dog"], 4)
    assert mask.dtype == np.uint8 and mask.sum() == 2 and mask[0, 0] == mask[3, 3] == 1 and note is None
    mask, note, missing = masks.image_mask([a.ravel(), None], ["cat", "dog"], 4)
    assert mask.sum() == 1 and missing == ["dog"] and note == "missing_objects: dog"
    mask, note, missing = masks.image_mask([None, None], ["cat", "dog"], 4)
    assert mask.shape == (4, 4) and mask.sum() == 0 and note == masks.NO_OBJECT_FOUND and missing == ["cat", "dog"]
    np.testing.assert_array_equal(masks.union_mask([a > 0, None, b > 0], 4), (a + b) > 0)
