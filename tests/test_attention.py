"""The capturing attention function and the sampling loop, on the tiny Janus (6 layers, 4 query
heads over 2 key/value heads, 8 x 8 grid): captured maps against eager attention (token 0,
predicted at the prefill step, included), capture never changes what is sampled, per-row
seeds, and the loop against a teacher-forced CFG pass and against ``generate``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ospo import attention, sampling

PROMPTS = ["a red dog to the left of a wooden bench in a park", "a cat"]  # different lengths
LAYERS = [1, 2, 3, 4]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny per-step ops: one intra-op thread is ~10x faster than two on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ids(engine):
    ids = engine.image_prompt_ids(PROMPTS)
    assert len(ids[0]) > len(ids[1]) + 3  # the batch is left padded
    return ids


def _spans(ids):
    # row 0: an object with two spans, a multi-token span, an absent object; row 1: BOS and BOI
    # (the prefill's last query attends to itself) and a middle token
    return [[[[3, 5], [7, 8]], [[9, 12]], []], [[[0, 1]], [[len(ids[1]) - 1, len(ids[1])]], [[4, 5]]]]


def _eager_maps(engine, ids, tokens, spans, layers):
    """Reference: eager attention, output_attentions=True, teacher forced over [x ; tokens[:-1]]
    in the same left-padded batch; per object: mean over span tokens, heads, layers."""
    emb, mask, pos, P, T, B = sampling._teacher_forced_inputs(engine, ids, tokens, cfg=False)
    cfg = engine.model.model.language_model.config
    old = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = engine.model.model.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                                                    output_attentions=True, use_cache=False)
    finally:
        cfg._attn_implementation = old
    att = torch.stack([out.attentions[i] for i in layers]).double()  # (Ly, B, H, Q, KV)
    att = att[:, :, :, P - 1:P - 1 + T, :].mean(dim=(0, 2))  # (B, T, KV): query P-1+t predicts token t
    res = []
    for r, row in enumerate(spans):
        shift = P - len(ids[r])
        maps = []
        for obj in row:
            cols = [shift + c for a, b in obj for c in range(a, b)]
            maps.append(att[r][:, cols].mean(-1).numpy() if cols else None)
        res.append(maps)
    return res


@pytest.mark.parametrize("layers", [LAYERS, [0, 2, 5]], ids=["range", "scattered"])
def test_captured_maps_equal_eager_attention_token0_gqa_left_padded(engine, layers):
    # a contiguous layer range is read from the KV store as a view; scattered layers gathered
    lm = engine.model.model.language_model
    assert lm.config.num_key_value_heads < lm.config.num_attention_heads  # grouped-query heads
    ids = _ids(engine)
    spans = _spans(ids)
    res = sampling.sample_images(engine, ids, [11, 12], guidance_scale=2.0, batch_size=2,
                                 capture=sampling.CaptureSpec(layers, spans))
    ref = _eager_maps(engine, ids, [r.tokens for r in res], spans, layers)
    tf = sampling.teacher_forced_maps(engine, ids, [r.tokens for r in res], spans, layers)
    for r in range(2):
        for o in range(3):
            want = ref[r][o]
            got = res[r].maps[o]
            if want is None:
                assert got is None and tf[r][o] is None
                continue
            assert got.shape == (engine.num_image_tokens,)
            assert abs(got[0] - want[0]) < 1e-5  # token 0: the prefill step's last query
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
            np.testing.assert_allclose(tf[r][o], want, atol=1e-5, rtol=0)
    assert res[0].maps[0].max() > 0  # a real signal, not zeros everywhere
    # one unpadded prompt: transformers passes mask=None (sdpa's is_causal path)
    solo = sampling.teacher_forced_maps(engine, ids[1:], [res[1].tokens], spans[1:], layers)
    ref1 = _eager_maps(engine, ids[1:], [res[1].tokens], spans[1:], layers)
    for o in range(3):
        np.testing.assert_allclose(solo[0][o], ref1[0][o], atol=1e-5, rtol=0)
    # the model is back on its own implementation
    assert lm.config._attn_implementation != attention.NAME


def test_capture_on_off_same_tokens_and_neighbour_independence(engine):
    ids = _ids(engine)
    spans = _spans(ids)
    on = sampling.sample_images(engine, ids, [5, 6], guidance_scale=2.0, batch_size=2,
                                capture=sampling.CaptureSpec(LAYERS, spans))
    off = sampling.sample_images(engine, ids, [5, 6], guidance_scale=2.0, batch_size=2)
    assert [r.tokens for r in on] == [r.tokens for r in off]
    assert off[0].maps is None
    # row 1 alone, and next to another neighbour with another seed: the same image
    alone = sampling.sample_images(engine, ids[1:], [6], guidance_scale=2.0)
    other = sampling.sample_images(engine, [engine.image_prompt_ids(["three green apples"])[0], ids[1]], [99, 6],
                                   guidance_scale=2.0, batch_size=2)
    assert alone[0].tokens == off[1].tokens == other[1].tokens
    assert off[0].tokens != off[1].tokens
    # another seed, another image
    assert sampling.sample_images(engine, ids[1:], [7], guidance_scale=2.0)[0].tokens != off[1].tokens


def test_capture_seconds_reported_inside_the_run(engine):
    """``stats`` accumulates the time spent in the capture code: positive, below the call's
    own time, added to by a later call, and absent without capture."""
    import time

    ids = _ids(engine)
    st, off = {}, {}
    t0 = time.perf_counter()
    sampling.sample_images(engine, ids + ids, [1, 2, 3, 4], guidance_scale=2.0, batch_size=2,
                           capture=sampling.CaptureSpec(LAYERS, _spans(ids) * 2), stats=st)
    wall = time.perf_counter() - t0
    assert 0 < st["capture_seconds"] < wall
    first = st["capture_seconds"]
    sampling.sample_images(engine, ids, [1, 2], guidance_scale=2.0, batch_size=2,
                           capture=sampling.CaptureSpec(LAYERS, _spans(ids)), stats=st)
    assert st["capture_seconds"] > first  # a second call adds to the same dict
    sampling.sample_images(engine, ids, [1, 2], guidance_scale=2.0, batch_size=2, stats=off)
    assert off == {}


def test_greedy_loop_matches_teacher_forced_cfg_and_generate(engine):
    ids = _ids(engine)
    greedy = sampling.sample_images(engine, ids, [0, 0], guidance_scale=3.0, temperature=0.0, batch_size=2)
    toks = [r.tokens for r in greedy]
    logits = sampling.teacher_forced_cfg_logits(engine, ids, toks, guidance_scale=3.0)
    assert logits.argmax(-1).tolist() == toks
    # the stock path, one unpadded prompt (generate's own greedy CFG loop)
    x = torch.tensor([ids[1]], device=engine.device)
    with torch.no_grad():
        ref = engine.model.generate(x, attention_mask=torch.ones_like(x), generation_mode="image",
                                    guidance_scale=3.0, do_sample=False)
    assert ref[0].tolist() == toks[1]


@pytest.mark.parametrize("chunk", [1, 5])
def test_capture_chunk_size_does_not_change_the_maps(engine, monkeypatch, chunk):
    """The sampler scores k decode steps per flush, each step masked to the keys it saw:
    per-step flushes (1) and chunks that do not divide the 64 steps (5, the last one short)
    give the default's maps to float rounding."""
    ids = _ids(engine)
    spec = sampling.CaptureSpec(LAYERS, _spans(ids))
    assert sampling.capture_chunk(len(LAYERS), 2, 4, 100) == sampling.CAPTURE_CHUNK_MAX
    assert sampling.capture_chunk(20, 16, 32, 700) == 2  # Janus-Pro-7B, batch 16, grid 24
    assert sampling.capture_chunk(20, 64, 32, 700) == 1
    ref = sampling.sample_images(engine, ids, [1, 2], guidance_scale=2.0, batch_size=2, capture=spec)
    monkeypatch.setattr(sampling, "CAPTURE_CHUNK_MAX", chunk)
    got = sampling.sample_images(engine, ids, [1, 2], guidance_scale=2.0, batch_size=2, capture=spec)
    assert [r.tokens for r in got] == [r.tokens for r in ref]
    for a, b in zip(got, ref):
        for x, y in zip(a.maps, b.maps):
            if x is not None:
                np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def test_inlined_llama_layers_equal_the_module_calls_and_yield_to_hooks(engine, monkeypatch):
    """The decode step's written-out Llama layer (``_llama_layer_step``) against the stock
    ``layer(...)`` calls: the same tokens and bit-identical maps, in a left-padded batch with
    capture; and any forward hook on a layer sends the step back to the module calls."""
    ids = _ids(engine)
    lm = engine.model.model.language_model
    assert sampling._stock_llama_layers(lm)
    spec = sampling.CaptureSpec(LAYERS, _spans(ids))
    used = []
    real = sampling._llama_layer_step

    def counting(*a, **k):
        used.append(1)
        return real(*a, **k)

    monkeypatch.setattr(sampling, "_llama_layer_step", counting)
    fast = sampling.sample_images(engine, ids, [3, 4], guidance_scale=2.0, batch_size=2, capture=spec)
    assert used  # the inline path ran
    monkeypatch.setattr(sampling, "_stock_llama_layers", lambda lm: False)
    used.clear()
    slow = sampling.sample_images(engine, ids, [3, 4], guidance_scale=2.0, batch_size=2, capture=spec)
    assert not used
    assert [r.tokens for r in fast] == [r.tokens for r in slow]
    for a, b in zip(fast, slow):
        for x, y in zip(a.maps, b.maps):
            assert (x is None) == (y is None)
            if x is not None:
                np.testing.assert_array_equal(x, y)
    monkeypatch.undo()
    handle = lm.layers[2].mlp.register_forward_hook(lambda mod, inp, out: out)
    try:
        assert not sampling._stock_llama_layers(lm)
    finally:
        handle.remove()
    assert sampling._stock_llama_layers(lm)


def test_default_layers_clamped():
    assert attention.default_layers(24, 5) == list(range(5, 19))
    assert attention.default_layers(6, 5) == [2, 3]
    assert attention.default_layers(6, 1) == [1, 2, 3, 4]
    assert attention.default_layers(1, 5) == [0]
    with pytest.raises(ValueError):
        attention.ObjectAttentionCapture([], [[[]]], prompt_len=2, steps=2)
