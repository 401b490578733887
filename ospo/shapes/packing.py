"""Cheaper training batches for the ShapesWorld recipe, with the loss of the plain ones.

- :func:`packed_lm_loss`: rows that share an image (yes/no questions about one scene) as one
  sequence, the image once and each question behind it under a 4D attention mask;
- :func:`bucketed_lm_loss`: rows of very different lengths (the stage-job text rows, 42-132
  tokens) in length buckets instead of one batch padded to the longest;
- :func:`pack_rows` (+ :func:`packed_lm_loss`): text rows that share a template's prefix
  packed into sequences of at most ``max_len`` tokens, the prefix once in each.

All give :func:`ospo.shapes.pretrain.lm_loss`'s value (the mean cross-entropy over every
answer token) and its gradients; ``tests/test_shapes_packing.py`` checks that, and
``bench/bench_pretrain.py`` measures what they save side by side. The recipe packs its
text rows (``Recipe.text_pack_len``). It does not pack yes/no questions: a build that packed
the same 48 questions onto 12 images learned yes/no worse
(``docs/results/shapes-recipe-packed-build.json``), and measured afterwards, a step teaches
yes/no by its number of distinct images, so packing must add questions to a step's images,
not replace them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def packed_lm_loss(model, groups: list[list[tuple[list[int], int]]], pad: int, pixel_values) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens of rows that share their image.

    ``groups[g]`` are (ids, answer start) rows about image ``pixel_values[g]``. Their common
    prefix (at most up to the first answer start: the chat header and the image) appears once;
    each row's rest follows it, attending to the prefix and to itself only, at the positions it
    would hold alone, so every answer token gets the logits it gets as a row of its own.
    Written here because transformers' packed-sequence support (position ids that restart at
    each sequence) cannot share a prefix between sequences."""
    seqs, segs, poss, labs = [], [], [], []
    for rows in groups:
        first = rows[0][0]
        P = shared_prefix(rows)
        seq, seg, pos, lab = list(first[:P]), [0] * P, list(range(P)), [-100] * P
        for k, (x, s) in enumerate(rows, 1):
            seq += x[P:]
            seg += [k] * (len(x) - P)
            pos += list(range(P, len(x)))
            lab += [-100 if j < s else x[j] for j in range(P, len(x))]
        seqs.append(seq)
        segs.append(seg)
        poss.append(pos)
        labs.append(lab)
    T, B = max(map(len, seqs)), len(seqs)
    ids = torch.full((B, T), pad, dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    lab = torch.full((B, T), -100, dtype=torch.long)
    for i in range(B):
        o = T - len(seqs[i])
        ids[i, o:], seg[i, o:] = torch.tensor(seqs[i]), torch.tensor(segs[i])
        pos[i, o:], lab[i, o:] = torch.tensor(poss[i]), torch.tensor(labs[i])
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & (seg[:, None, :] >= 0)
    allowed &= (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)
    allowed |= torch.eye(T, dtype=torch.bool)   # a pad attends to itself: no query without keys
    out = model(input_ids=ids, attention_mask=allowed[:, None], position_ids=pos, pixel_values=pixel_values,
                use_cache=False)
    logits = out.logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1), ignore_index=-100)


def bucketed_lm_loss(model, rows: list[list[int]], starts: list[int], pad: int, pixel_values=None,
                     buckets: int = 2) -> torch.Tensor:
    """:func:`ospo.shapes.pretrain.lm_loss` of the rows sorted by length and run as ``buckets``
    batches, each padded to its own longest row: each bucket's mean weighted by its number of
    answer tokens, so the result is still the mean over every answer token of all rows."""
    from ospo.shapes.pretrain import lm_loss

    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    buckets = max(1, buckets)
    parts = [p for p in (order[k * len(order) // buckets:(k + 1) * len(order) // buckets] for k in range(buckets)) if p]
    n = [sum(len(rows[i]) - starts[i] for i in p) for p in parts]
    total = sum(lm_loss(model, [rows[i] for i in p], [starts[i] for i in p], pad,
                        None if pixel_values is None else pixel_values[p]) * k for p, k in zip(parts, n))
    return total / max(1, sum(n))


def shared_prefix(rows: list[tuple[list[int], int]]) -> int:
    """Length of the prefix :func:`packed_lm_loss` writes once for ``rows``: their common
    token prefix, at most up to the earliest answer start."""
    first = rows[0][0]
    P = min(s for _, s in rows)
    for x, _ in rows[1:]:
        P = next((j for j in range(min(P, len(x))) if x[j] != first[j]), min(P, len(x)))
    return P


def pack_rows(rows: list[list[int]], starts: list[int], max_len: int) -> list[list[tuple[list[int], int]]]:
    """Groups of text rows for :func:`packed_lm_loss` (``pixel_values=None``), each at most
    ``max_len`` tokens packed (a row longer than that stays alone).

    The stage-job rows of one template share a long prefix (the instruction and its worked
    example: 78 of the densification rows' ~134 tokens, 83 of decomposition's ~133, 37 of
    object naming's ~55), and padding each batch to its longest row wastes a third of the
    rest. Rows are sorted by their tokens, so that rows sharing a template sit together, and
    filled greedily into sequences of at most ``max_len`` tokens: the shared prefix once, each
    row's rest behind it. Rows of different templates that land in one sequence share only
    the chat header, which is plain sequence packing. Deterministic in its input."""
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    groups: list[list[tuple[list[int], int]]] = []
    for i in order:
        row = (rows[i], starts[i])
        if groups:
            cand = groups[-1] + [row]
            P = shared_prefix(cand)
            if P + sum(len(x) - P for x, _ in cand) <= max_len:
                groups[-1] = cand
                continue
        groups.append([row])
    return groups


def group_questions(engine, batcher, n_images: int, per_image: int, rng) -> tuple[list, list[int]]:
    """``n_images`` groups of ``per_image`` distinct yes/no rows (coin-flip truth, questions
    of :func:`ospo.shapes.pretrain.yes_no_question`) about images of a recipe ``Batcher``'s
    understanding pool; returns the groups and the pool indices of their images."""
    from ospo.shapes.pretrain import yes_no_question
    from ospo.understanding import query_ids

    groups, pick = [], []
    for _ in range(n_images):
        i = rng.randrange(len(batcher.und_layouts))
        rows, seen = [], set()
        for _ in range(8 * per_image):
            q, truth, _ = yes_no_question(rng, batcher.und_layouts[i].scene, batcher.und_dets[i], rng.random() < 0.5)
            if q in seen:
                continue
            seen.add(q)
            head = query_ids(engine, q)
            rows.append((head + (batcher.yes if truth else batcher.no) + [engine.ids.eos], len(head)))
            if len(rows) == per_image:
                break
        groups.append(rows)
        pick.append(i)
    return groups, pick
