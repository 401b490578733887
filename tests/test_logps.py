"""Teacher-forced visual log-probs against a step-by-step KV-cache decode on the tiny Janus."""

from __future__ import annotations

import pytest
import torch

from ospo.logps import visual_logps

PROMPTS = ["a red cube", "a dog to the left of a bench under a tree", "three apples"]


def _stepwise_logps(model, prompt: list[int], tokens: torch.Tensor) -> torch.Tensor:
    """One row, no padding: prefill the prompt, then feed one visual token per step through
    the KV cache, reading the generation head as ``generate(generation_mode="image")`` does."""
    lm = model.model.language_model
    emb = model.get_input_embeddings()(torch.tensor([prompt]))
    out = lm(inputs_embeds=emb, use_cache=True)
    past, pos = out.past_key_values, len(prompt)
    hidden = out.last_hidden_state[:, -1]
    res = []
    for t in range(tokens.shape[0]):
        lp = torch.log_softmax(model.model.generation_head(hidden).float(), -1)[0, tokens[t]]
        res.append(lp)
        e = model.prepare_embeddings_for_image_generation(tokens[t].view(1, 1))
        out = lm(inputs_embeds=e, past_key_values=past, use_cache=True,
                 position_ids=torch.tensor([[pos]]))
        past, pos = out.past_key_values, pos + 1
        hidden = out.last_hidden_state[:, -1]
    return torch.stack(res)


@torch.no_grad()
def test_matches_kv_cache_decode_with_left_padding(engine):
    model = engine.model
    ids = engine.image_prompt_ids(PROMPTS)
    assert len({len(x) for x in ids}) > 1  # the batch really is left padded
    assert all(x[-1] == engine.ids.boi for x in ids)
    n = engine.num_image_tokens
    codebook = model.config.vq_config.num_embeddings
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, codebook, (len(PROMPTS), n), generator=g)
    batched = visual_logps(engine, ids, tokens)
    assert batched.shape == (len(PROMPTS), n)
    for i in (0, 1):  # a left-padded row and the longest (unpadded) one
        ref = _stepwise_logps(model, ids[i], tokens[i])
        torch.testing.assert_close(batched[i], ref, atol=1e-5, rtol=0)
    # chosen and rejected concatenated = two separate forwards
    first = visual_logps(engine, ids[:1], tokens[:1])
    torch.testing.assert_close(first[0], batched[0], atol=1e-5, rtol=0)


def test_gradients_reach_generation_path_only(engine):
    model = engine.model
    ids = engine.image_prompt_ids(PROMPTS[:2])
    tokens = torch.randint(0, model.config.vq_config.num_embeddings, (2, engine.num_image_tokens))
    model.zero_grad(set_to_none=True)
    visual_logps(model, ids, tokens).sum().backward()
    has = lambda mod: any(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())  # noqa: E731
    m = model.model
    for mod in (m.language_model, m.generation_embeddings, m.generation_aligner, m.generation_head):
        assert has(mod)
    for mod in (m.vision_model, m.aligner, m.vqmodel):
        assert all(p.grad is None for p in mod.parameters())
    model.zero_grad(set_to_none=True)


def test_rejects_mismatched_rows(engine):
    with pytest.raises(ValueError):
        visual_logps(engine, engine.image_prompt_ids(PROMPTS[:1]), torch.zeros(2, engine.num_image_tokens, dtype=torch.long))
