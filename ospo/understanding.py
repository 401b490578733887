"""Yes/no self-VQA scoring (OSPO sec. 3.6): p(yes), p(no) of an image for a question.

For an image y and a question q the model sees one user turn ``[image, yes_no(q)]`` in the
chat template, and the answer position is the next token after ``<|Assistant|>:``.
p(yes) and p(no) come from the softmax over the WHOLE vocabulary at that position; p(yes)
is the largest probability among the "yes" token ids (:func:`yes_no_token_ids`), p(no)
likewise. The paper's margin is s_j(y) = p(yes) - p(no) and S(y) = mean_j s_j(y)
(:func:`margins`).

Batching (:func:`yes_no_probs`): the image of a prompt is the same for all its questions,
and so is every token up to ``<end_of_image>``: the chat text before the question is fixed.
By default (``mode="prefix"``) the vision encoder (SigLIP + aligner: the ``pooler_output`` of
``model.model.get_image_features``) runs ONCE per image, its features go to the model as
``mm_encoder_outputs`` (the model scatters them into the placeholder positions), and the
language model runs ONCE per image over that shared prefix with a KV cache; each
(image, question) row then runs only its ~20-token question suffix against its image's
cached keys/values, left padded (the pads sit between prefix and suffix, masked; positions
explicit), one forward with ``logits_to_keep=1`` per batch. ``mode="once"`` (encoder once,
full sequence per row) and ``mode="per_row"`` (pixel values with every row, the stock path)
compute the same numbers and are kept for the benchmark and the tests.

:func:`yes_no_probs_reference` is the plain path, one processor call and one forward per
(image, question): the batched path must agree with it (tests/test_understanding.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ospo import templates


# --- answer token ids -------------------------------------------------------------------

def answer_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """Token ids that start an answer with one of ``words``.

    A word that is one token contributes that token; a multi-token word contributes its
    first token, unless that token is blank (a bare space piece such as BPE's "Ġ", which
    starts " Yes" and " No" alike in a small vocabulary and says nothing about the answer).
    """
    out: list[int] = []
    for w in words:
        ids = tokenizer.encode(w, add_special_tokens=False)
        if not ids:
            continue
        if len(ids) > 1 and not tokenizer.decode(ids[:1]).strip():
            continue
        if ids[0] not in out:
            out.append(ids[0])
    return out


def yes_no_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """(yes ids, no ids) from :data:`templates.YES_WORDS` / :data:`templates.NO_WORDS`.

    An id that would start both a yes and a no word is dropped from both: it cannot tell the
    answers apart. Raises if either set ends up empty (the tokenizer cannot say yes or no).
    """
    yes, no = answer_ids(tokenizer, templates.YES_WORDS), answer_ids(tokenizer, templates.NO_WORDS)
    both = set(yes) & set(no)
    yes, no = [i for i in yes if i not in both], [i for i in no if i not in both]
    if not yes or not no:
        raise ValueError(f"the tokenizer has no usable yes/no answer tokens (yes {yes}, no {no})")
    return yes, no


# --- inputs ---------------------------------------------------------------------------------

def load_image(image):
    """A PIL RGB image from a PIL image or a path."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return im.convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def query_text(engine, question: str) -> str:
    """The chat text of the yes/no query, before placeholder expansion."""
    return engine.chat(templates.yes_no(question), image=True)


def query_ids(engine, question: str) -> list[int]:
    """Token ids of the yes/no query with the image placeholder expanded.

    Exactly what ``engine.processor(text=query_text(q), images=[img])`` tokenizes (same
    system-prompt rule, same expansion through the processor's own
    ``get_text_with_replacements``), without touching any pixels: the ids of a question
    do not depend on the image.
    """
    return image_chat_ids(engine, templates.yes_no(question))


def image_chat_ids(engine, user_text: str) -> list[int]:
    """Token ids of a one-image user turn (image first, then ``user_text``), placeholder
    expanded, ending where the assistant answers: the prompt of :func:`query_ids`, and of
    any other question about an image (ShapesWorld pretraining uses it for captions)."""
    proc = engine.processor
    text = engine.chat(user_text, image=True)
    if getattr(proc, "use_default_system_prompt", False):
        from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

        text = DEFAULT_SYSTEM_PROMPT + text
    n = text.count(proc.image_token)
    (text,), _ = proc.get_text_with_replacements([text], [proc.replace_image_token({}, i) for i in range(n)])
    return list(engine.tokenizer(text, add_special_tokens=True)["input_ids"])


def pixel_values(engine, images: Sequence) -> torch.Tensor:
    """Preprocessed pixels (n, 3, H, W) on the engine's device and dtype."""
    pv = engine.processor.image_processor([load_image(im) for im in images], return_tensors="pt")["pixel_values"]
    return pv.to(engine.device, engine.dtype)


@torch.no_grad()
def encode_images(engine, images: Sequence, *, batch_size: int = 32) -> torch.Tensor:
    """Vision features (n, num_image_tokens, hidden), one encoder pass per image."""
    feats = []
    for start in range(0, len(images), batch_size):
        pv = pixel_values(engine, images[start:start + batch_size])
        with engine.autocast():
            feats.append(engine.model.model.get_image_features(pv).pooler_output)
    return torch.cat(feats, 0)


# --- scoring --------------------------------------------------------------------------------

@dataclass
class ImageScore:
    """p(yes) and p(no) of one image for each of its questions."""

    p_yes: list[float]
    p_no: list[float]

    @property
    def s(self) -> list[float]:
        return margins(self.p_yes, self.p_no)[0]

    @property
    def S(self) -> float:
        return margins(self.p_yes, self.p_no)[1]


def margins(p_yes: Sequence[float], p_no: Sequence[float]) -> tuple[list[float], float]:
    """s_j = p(yes) - p(no) per question and S = mean_j s_j (OSPO sec. 3.6)."""
    if len(p_yes) != len(p_no) or not p_yes:
        raise ValueError("p_yes and p_no need the same, non-zero length")
    s = [float(a) - float(b) for a, b in zip(p_yes, p_no)]
    return s, sum(s) / len(s)


def _answer_probs(logits: torch.Tensor, yes: list[int], no: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.float(), dim=-1)
    return probs[:, yes].max(-1).values, probs[:, no].max(-1).values


MODES = ("prefix", "once", "per_row")


def prefix_length(engine, ids: Sequence[int]) -> int:
    """Length of the image prefix of a query: everything up to the last image placeholder,
    plus the ``<end_of_image>`` after it. These ids do not depend on the question."""
    last = max((i for i, t in enumerate(ids) if t == engine.ids.image), default=-1)
    if last < 0:
        return 0
    n = last + 1
    return n + 1 if n < len(ids) and ids[n] == engine.ids.eoi else n


@torch.no_grad()
def yes_no_probs(
    engine,
    images: Sequence,
    questions: Sequence[Sequence[str]],
    *,
    batch_size: int = 32,
    mode: str = "prefix",
) -> list[ImageScore]:
    """p(yes), p(no) for every image and each of its questions, batched.

    ``images[i]`` (PIL image or path) is asked ``questions[i]``. ``batch_size`` counts
    (image, question) rows per forward (and images per encoder / prefix pass).

    Modes, all computing the same numbers:

    - ``prefix`` (default): per chunk of images, the vision encoder runs once per image and
      the language model runs once per image over the shared prefix ``[... <begin_of_image>
      features <end_of_image>]`` with a KV cache; each (image, question) row then runs only
      its question suffix (left padded between prefix and suffix, masked, explicit
      positions) against its image's cached keys and values.
    - ``once``: vision encoder once per image, then the full sequence per row.
    - ``per_row``: pixel values with every row: one encoder pass per question (the stock
      processor path, batched).
    """
    if len(images) != len(questions):
        raise ValueError("one list of questions per image")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    yes, no = yes_no_token_ids(engine.tokenizer)
    pil = [load_image(im) for im in images]
    cache: dict[str, list[int]] = {}
    rows: list[tuple[int, int, list[int]]] = []  # (image index, question index, ids)
    for i, qs in enumerate(questions):
        for j, q in enumerate(qs):
            if q not in cache:
                cache[q] = query_ids(engine, q)
            rows.append((i, j, cache[q]))
    out = [ImageScore([0.0] * len(qs), [0.0] * len(qs)) for qs in questions]
    if not rows:
        return out

    def put(batch, logits):
        py, pn = _answer_probs(logits, yes, no)
        for (i, j, _), a, b in zip(batch, py.tolist(), pn.tolist()):
            out[i].p_yes[j] = a
            out[i].p_no[j] = b

    if mode == "prefix":
        n = prefix_length(engine, rows[0][2])
        if n and all(len(r[2]) > n and r[2][:n] == rows[0][2][:n] for r in rows):
            _prefix_shared(engine, pil, rows, rows[0][2][:n], batch_size, put)
            return out
        mode = "once"  # no common image prefix (not the case for the Janus chat template)
    feats = encode_images(engine, pil, batch_size=batch_size) if mode == "once" else None
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][2]))  # stable: equal lengths keep order
    for start in range(0, len(order), batch_size):
        batch = [rows[r] for r in order[start:start + batch_size]]
        ids, mask, pos = engine.left_pad([b[2] for b in batch])
        kwargs = {}
        if feats is not None:
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            img_idx = torch.tensor([b[0] for b in batch], device=engine.device)
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=feats[img_idx])}
        else:
            kwargs["pixel_values"] = pixel_values(engine, [pil[b[0]] for b in batch])
        with engine.autocast():
            logits = engine.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                                  logits_to_keep=1, **kwargs).logits[:, -1, :]
        put(batch, logits)
    return out


def _prefix_shared(engine, pil, rows, prefix, batch_size, put) -> None:
    """The ``prefix`` mode of :func:`yes_no_probs` (see there)."""
    from transformers import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model, dev, n = engine.model, engine.device, len(prefix)
    for c0 in range(0, len(pil), batch_size):
        chunk = list(range(c0, min(c0 + batch_size, len(pil))))
        feats = encode_images(engine, [pil[i] for i in chunk], batch_size=batch_size)
        ids = torch.tensor([prefix] * len(chunk), dtype=torch.long, device=dev)
        with engine.autocast():
            pre = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1,
                        mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=feats)})
        kv = [(k, v) for k, v, *_ in pre.past_key_values]
        local = {i: li for li, i in enumerate(chunk)}
        crows = sorted((r for r in rows if r[0] in local), key=lambda r: -(len(r[2]) - n))
        for start in range(0, len(crows), batch_size):
            batch = crows[start:start + batch_size]
            sfx = [r[2][n:] for r in batch]
            L = max(len(s) for s in sfx)
            B = len(batch)
            ids = torch.full((B, L), engine.ids.pad, dtype=torch.long)
            mask = torch.zeros((B, n + L), dtype=torch.long)
            mask[:, :n] = 1
            pos = torch.full((B, L), n, dtype=torch.long)
            for b, s in enumerate(sfx):
                ids[b, L - len(s):] = torch.tensor(s, dtype=torch.long)
                mask[b, n + L - len(s):] = 1
                pos[b, L - len(s):] = torch.arange(n, n + len(s))
            sel = torch.tensor([local[r[0]] for r in batch], device=dev)
            past = DynamicCache(ddp_cache_data=[(k[sel], v[sel]) for k, v in kv])
            with engine.autocast():
                logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                               past_key_values=past, use_cache=True, logits_to_keep=1).logits[:, -1, :]
            put(batch, logits)
        del pre, kv


@torch.no_grad()
def yes_no_probs_reference(engine, image, question: str) -> tuple[float, float]:
    """The plain path for one (image, question): processor call + one full forward."""
    yes, no = yes_no_token_ids(engine.tokenizer)
    inputs = engine.processor(text=[query_text(engine, question)], images=[load_image(image)], return_tensors="pt")
    inputs = {k: v.to(engine.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(engine.dtype)
    with engine.autocast():
        logits = engine.model(**inputs, logits_to_keep=1).logits[:, -1, :]
    py, pn = _answer_probs(logits, yes, no)
    return float(py[0]), float(pn[0])
