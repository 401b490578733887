"""Yes/no scoring on the tiny random Janus: batched (left padded; encoder and image prefix
once per image) equals the plain one-question-per-forward path; the answer ids are looked
up correctly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ospo import templates, understanding as U

QUESTIONS = [
    ["Is there a cat?", "Is the big red circle to the left of the small blue square?"],
    ["Are there two dogs?"],
    ["Is it?", "Is there a cat?", "Are the three green triangles above the wooden bench?"],
    ["Is the star striped?", "Are there rings?"],
]


def _images(n, side=64):
    return [Image.fromarray(np.random.RandomState(100 + s).randint(0, 255, (side, side, 3), dtype=np.uint8))
            for s in range(n)]


def _plain(engine, image, question):
    """Independent reference: processor on (chat text, image), one full forward, softmax over
    the whole vocabulary at the last position, max over the yes / no ids."""
    text = engine.chat(templates.yes_no(question), image=True)
    assert text.endswith("<|Assistant|>:")
    inputs = engine.processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = engine.model(**inputs).logits[0, -1]
    probs = torch.softmax(logits.double(), -1)
    yes, no = U.yes_no_token_ids(engine.tokenizer)
    return float(probs[yes].max()), float(probs[no].max())


def test_answer_ids_on_the_tiny_tokenizer(engine):
    """Single-token words contribute their id; ' Yes' / ' No' split into a blank 'Ġ' + word
    here, and a blank first piece says nothing about the answer, so it is skipped."""
    tok = engine.tokenizer
    yes, no = U.yes_no_token_ids(tok)
    one = lambda w: tok.encode(w, add_special_tokens=False)  # noqa: E731
    assert yes == [one("yes")[0], one("Yes")[0], one(" yes")[0]]
    assert no == [one("no")[0], one("No")[0], one(" no")[0]]
    assert len(one(" Yes")) == 2 and one(" Yes")[0] not in yes + no
    assert {tok.decode([i]).strip() for i in yes} == {"yes", "Yes"}
    assert {tok.decode([i]).strip() for i in no} == {"no", "No"}


class _FakeTok:
    """A word -> pieces table: ' Yes' = [' Y', 'es'] (a meaningful first piece), ' No' =
    [' ', 'No'] (a blank first piece), and 'Yes' / 'No' share the token 2."""

    table = {"yes": [1], "Yes": [2], " yes": [3], " Yes": [4, 5], "no": [6], "No": [2], " no": [7], " No": [8, 9]}
    pieces = {1: "yes", 2: "X", 3: " yes", 4: " Y", 5: "es", 6: "no", 7: " no", 8: " ", 9: "No"}

    def encode(self, w, add_special_tokens=False):
        return self.table[w]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_answer_ids_rules():
    """' Yes' = [' Y', 'es'] -> first piece 4 counts; ' No' = [' ', 'No'] -> blank first piece,
    skipped; id 2 starts both 'Yes' and 'No' -> dropped from both sets."""
    yes, no = U.yes_no_token_ids(_FakeTok())
    assert yes == [1, 3, 4]
    assert no == [6, 7]


def test_query_ids_match_the_processor(engine):
    img = _images(1)[0]
    for q in ("Is there a cat?", QUESTIONS[2][2]):
        ref = engine.processor(text=[U.query_text(engine, q)], images=[img])["input_ids"][0]
        ids = U.query_ids(engine, q)
        assert ids == list(ref)
        assert ids.count(engine.ids.image) == engine.num_image_tokens


def test_batched_equals_one_at_a_time(engine):
    """4 images, 8 (image, question) rows of lengths 83..102 tokens, batch_size 3 (three
    forwards) and 8 (one forward, up to 19 pads on the left). Every p(yes), p(no) matches the
    plain path within 1e-5 absolute AND 1e-4 relative: the probabilities of a random
    783-token model are ~1e-3, so 1e-5 alone would allow a 1% error (forgetting the
    attention mask moves them by ~40%)."""
    imgs = _images(len(QUESTIONS))
    refs = {(i, q): _plain(engine, img, q) for i, (img, qs) in enumerate(zip(imgs, QUESTIONS)) for q in qs}
    for mode, bs in (("prefix", 3), ("prefix", 8), ("prefix", 1), ("once", 3), ("once", 8), ("per_row", 3)):
        got = U.yes_no_probs(engine, imgs, QUESTIONS, batch_size=bs, mode=mode)
        for i, (img, qs, sc) in enumerate(zip(imgs, QUESTIONS, got)):
            assert len(sc.p_yes) == len(sc.p_no) == len(qs)
            for q, py, pn in zip(qs, sc.p_yes, sc.p_no):
                ry, rn = refs[(i, q)]
                for a, b in ((py, ry), (pn, rn)):
                    assert abs(a - b) <= 1e-5 and abs(a - b) <= 1e-4 * b, (mode, bs, q, a, b)
                assert 0 < py < 1 and 0 < pn < 1
                assert U.yes_no_probs_reference(engine, img, q) == pytest.approx((ry, rn), rel=1e-5)
    # the test is sensitive to which image a row sees: the same question on two images differs
    a = U.yes_no_probs(engine, imgs[:2], [["Is there a cat?"]] * 2)
    assert abs(a[0].p_yes[0] - a[1].p_yes[0]) > 1e-7 or abs(a[0].p_no[0] - a[1].p_no[0]) > 1e-7


def test_paths_and_batch_size_one(engine, tmp_path):
    """Images given as PNG paths; batch_size 1 gives the same numbers as batch_size 8."""
    imgs = _images(2)
    paths = []
    for i, im in enumerate(imgs):
        p = tmp_path / f"{i}.png"
        im.save(p)
        paths.append(p)
    qs = QUESTIONS[:2]
    a = U.yes_no_probs(engine, paths, qs, batch_size=1)
    b = U.yes_no_probs(engine, imgs, qs, batch_size=8)
    for x, y in zip(a, b):
        assert x.p_yes == pytest.approx(y.p_yes, abs=1e-6) and x.p_no == pytest.approx(y.p_no, abs=1e-6)


def test_vision_encoder_and_image_prefix_run_once_per_image(engine):
    """4 images, 8 questions in all. Images seen by the vision tower: 4 in modes prefix and
    once, 8 in per_row. Language-model rows that carry the 64 image positions: 4 in prefix
    mode (one prefix pass per image; the 8 question rows run only their suffixes), 8 in the
    others (the full sequence per question)."""
    vis, lm = [], []
    h1 = engine.model.model.vision_model.register_forward_hook(lambda m, a, o: vis.append(a[0].shape[0]))
    h2 = engine.model.model.language_model.register_forward_hook(
        lambda m, a, kw, o: lm.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True)
    imgs = _images(len(QUESTIONS))
    seen = {}
    try:
        for mode in ("prefix", "once", "per_row"):
            vis.clear(), lm.clear()
            U.yes_no_probs(engine, imgs, QUESTIONS, batch_size=3, mode=mode)
            seen[mode] = (sum(vis), sum(b for b, t in lm if t >= engine.num_image_tokens),
                          sum(b for b, t in lm if t < engine.num_image_tokens))
    finally:
        h1.remove(), h2.remove()
    assert seen["prefix"] == (4, 4, 8)  # suffix rows: 8, each shorter than the image
    assert seen["once"] == (4, 8, 0)
    assert seen["per_row"] == (8, 8, 0)


def test_prefix_length(engine):
    """The shared prefix ends at <end_of_image>: the same for every question, and the rest
    (the question and '<|Assistant|>:') is what differs."""
    a, b = U.query_ids(engine, "Is there a cat?"), U.query_ids(engine, "Are there two dogs?")
    n = U.prefix_length(engine, a)
    assert n == U.prefix_length(engine, b) and a[:n] == b[:n] and a[n:] != b[n:]
    assert a[n - 1] == engine.ids.eoi and engine.ids.image not in a[n:]
    assert U.prefix_length(engine, engine.tokenizer(engine.chat("no image here"))["input_ids"]) == 0


def test_margins():
    """p_yes [0.7, 0.2, 0.5], p_no [0.1, 0.6, 0.5] -> s = [0.6, -0.4, 0.0], S = 0.2 / 3."""
    s, S = U.margins([0.7, 0.2, 0.5], [0.1, 0.6, 0.5])
    assert s == pytest.approx([0.6, -0.4, 0.0])
    assert S == pytest.approx(0.2 / 3)
    sc = U.ImageScore([0.7, 0.2, 0.5], [0.1, 0.6, 0.5])
    assert sc.S == pytest.approx(S) and sc.s == pytest.approx(s)
    with pytest.raises(ValueError):
        U.margins([], [])
    with pytest.raises(ValueError):
        U.yes_no_probs(None, [1], [])
