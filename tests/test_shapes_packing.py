"""Packed and bucketed batches (ospo.shapes.packing) give the loss and gradients of the
plain rows of ospo.shapes.pretrain.lm_loss: only the cost may change."""

from __future__ import annotations

import random

import pytest

from ospo.shapes import packing
from ospo.shapes import pretrain as pt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny recipe's engine and data pool (random weights: the loss values do not matter)."""
    import torch
    from transformers import JanusForConditionalGeneration

    from ospo.engine import Engine
    from ospo.tiny import make_processor

    r = pt.Recipe(hidden=32, layers=2, heads=2, kv_heads=1, vq_steps=1, gen_pool=4, und_pool=6, text_rows=5)
    tok = pt.build_world_tokenizer(r)
    torch.manual_seed(0)
    cfg = pt.model_config(r, tok)
    model = JanusForConditionalGeneration(cfg).eval()
    eng = Engine(model, make_processor(tok, cfg), path=str(tmp_path_factory.mktemp("e")), device=torch.device("cpu"),
                 dtype=torch.float32)
    return eng, pt.Batcher(eng, model.model.vqmodel, r, progress=False)


def test_packed_rows_give_the_loss_and_gradients_of_separate_rows(tiny):
    """Questions about one image packed behind one copy of it score every answer token as
    the row alone would (a mask or position slip changes the logits and fails this)."""
    import torch

    from ospo.shapes import vq as vqm

    eng, b = tiny
    groups, pick = packing.group_questions(eng, b, 3, 3, random.Random(0))
    assert [len(g) for g in groups] == [3, 3, 3]
    assert all(len({tuple(x) for x, _ in g}) == 3 for g in groups)   # distinct questions per image
    rows = [x for g in groups for x, _ in g]
    starts = [s for g in groups for _, s in g]
    pv = vqm.to_pixels(b.und_recon[pick])
    pv_rows = vqm.to_pixels(b.und_recon[[i for i, g in zip(pick, groups) for _ in g]])
    m = eng.model
    params = [p for p in m.parameters() if p.requires_grad]
    sep = pt.lm_loss(m, rows, starts, eng.ids.pad, pv_rows)
    g_sep = torch.autograd.grad(sep, params, allow_unused=True)
    packed = packing.packed_lm_loss(m, groups, eng.ids.pad, pv)
    g_pack = torch.autograd.grad(packed, params, allow_unused=True)
    assert packed.item() == pytest.approx(sep.item(), rel=1e-5)
    assert sum(a is not None for a in g_sep) > 10
    for a, c in zip(g_sep, g_pack):
        assert (a is None) == (c is None)
        if a is not None:
            assert torch.allclose(a, c, atol=1e-6, rtol=1e-4)
    # the second question's answer, scored behind the first (unlabelled) one: packed, it
    # is scored as alone; written out as one row that sees the first question, it is not
    (x1, _), (x2, s2) = groups[0][:2]
    P = next(j for j in range(len(x1)) if x1[j] != x2[j])
    alone = packing.packed_lm_loss(m, [[(x2, s2)]], eng.ids.pad, pv[:1]).item()
    packed2 = packing.packed_lm_loss(m, [[(x1, len(x1)), (x2, s2)]], eng.ids.pad, pv[:1]).item()
    seen = packing.packed_lm_loss(m, [[(x1 + x2[P:], len(x1) + s2 - P)]], eng.ids.pad, pv[:1]).item()
    # (random weights give near-uniform logits: seeing the other question moves the loss by ~6e-4)
    assert abs(packed2 - alone) <= 1e-6 * alone and abs(seen - alone) > 1e-4 * alone


def test_length_buckets_keep_the_loss(tiny):
    eng, b = tiny
    rows, starts = b.text()
    assert len({len(x) for x in rows}) > 1
    one = pt.lm_loss(eng.model, rows, starts, eng.ids.pad).item()
    for k in (1, 2, 3, len(rows) + 2):
        assert packing.bucketed_lm_loss(eng.model, rows, starts, eng.ids.pad, buckets=k).item() == pytest.approx(
            one, rel=1e-5)


def test_packed_text_rows_give_the_loss_and_gradients_of_padded_rows(tiny):
    """Stage-job rows packed by template (shared instruction once, each row behind it) and
    into sequences of at most max_len tokens score like the padded batch the recipe used."""
    import torch

    eng, b = tiny
    rows, starts = [], []
    for _ in range(3):
        r, s = b.text()
        rows += r
        starts += s
    longest = max(map(len, rows))
    m = eng.model
    params = [p for p in m.parameters() if p.requires_grad]
    plain = pt.lm_loss(m, rows, starts, eng.ids.pad)
    g_plain = torch.autograd.grad(plain, params, allow_unused=True)
    groups = packing.pack_rows(rows, starts, max_len=3 * longest)
    assert sorted(x for g in groups for x, _ in g) == sorted(rows)          # every row once
    lens = [packing.shared_prefix(g) + sum(len(x) - packing.shared_prefix(g) for x, _ in g) for g in groups]
    assert max(lens) <= 3 * longest and len(groups) < len(rows)
    assert sum(lens) < sum(map(len, rows))                                   # a shared prefix was written once
    packed = packing.packed_lm_loss(m, groups, eng.ids.pad, None)
    g_pack = torch.autograd.grad(packed, params, allow_unused=True)
    assert packed.item() == pytest.approx(plain.item(), rel=1e-5)
    for a, c in zip(g_plain, g_pack):
        assert (a is None) == (c is None)
        if a is not None:
            assert torch.allclose(a, c, atol=1e-6, rtol=1e-4)
    # a limit below every row leaves each row alone, which is the plain batch again
    assert all(len(g) == 1 for g in packing.pack_rows(rows, starts, max_len=1))
