"""Teacher-forced log-probs of visual tokens under Janus' image-generation head.

``JanusForConditionalGeneration.forward`` returns text (``lm_head``) logits only, so the
image path is assembled here the way ``generate(generation_mode="image")`` runs it:

    prompt ids (chat template + <begin_of_image>)  -> language model input embeddings
    visual tokens y_0 .. y_{N-2}                   -> prepare_embeddings_for_image_generation
    model.model.language_model(concatenation)      -> hidden states
    model.model.generation_head(hidden[BOI .. ])   -> logits for y_0 .. y_{N-1}

The hidden state at the ``<begin_of_image>`` position predicts y_0, the one at y_{t-1}
predicts y_t (the same positions ``generate`` samples from). Prompts of different lengths
are left padded with an attention mask and explicit position ids, so a row's log-probs do
not depend on its batch neighbours. The trainer concatenates chosen and rejected rows into
one batch: one forward, one backward.

Works on a bare model or on an :class:`ospo.engine.Engine` (whose pad id it then uses; the
pad id does not change the result, padded positions are masked out).
"""

from __future__ import annotations

import torch


def pad_prompts(prompt_ids: list[list[int]], pad_id: int = 0, device=None):
    """Left-pad prompt id lists: ``input_ids``, ``attention_mask`` ``[B, P]``."""
    P = max(len(s) for s in prompt_ids)
    ids = torch.full((len(prompt_ids), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), P), dtype=torch.long)
    for i, s in enumerate(prompt_ids):
        ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, P - len(s):] = 1
    return ids.to(device), mask.to(device)


def visual_logps_padded(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        tokens: torch.Tensor) -> torch.Tensor:
    """Log-probs ``[B, N]`` (float32) of ``tokens`` ``[B, N]`` given left-padded prompts ``[B, P]``
    that end in ``<begin_of_image>``. Differentiable; runs in the caller's autocast context."""
    B, P = input_ids.shape
    N = tokens.shape[1]
    prompt_emb = model.get_input_embeddings()(input_ids)
    parts = [prompt_emb]
    if N > 1:
        parts.append(model.prepare_embeddings_for_image_generation(tokens[:, :-1]).to(prompt_emb.dtype))
    embeds = torch.cat(parts, dim=1)
    mask = torch.cat([attention_mask, attention_mask.new_ones((B, N - 1))], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                     use_cache=False)
    hidden = out.last_hidden_state[:, P - 1:, :]  # BOI position onward: predicts y_0 .. y_{N-1}
    logits = model.model.generation_head(hidden).float()
    # log_softmax gathered without materializing a second [B, N, V] tensor
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def visual_logps(engine_or_model, prompt_ids: list[list[int]], tokens: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log pi(y_t | x, y_<t) ``[B, N]`` for each prompt (id list ending in BOI,
    as :meth:`ospo.engine.Engine.image_prompt_ids` builds it) and its visual tokens."""
    if isinstance(engine_or_model, torch.nn.Module):
        model, pad = engine_or_model, 0
    else:  # an Engine
        model, pad = engine_or_model.model, engine_or_model.ids.pad
    device = next(model.parameters()).device
    if len(prompt_ids) != tokens.shape[0]:
        raise ValueError(f"{len(prompt_ids)} prompts for {tokens.shape[0]} token rows")
    input_ids, attention_mask = pad_prompts(prompt_ids, pad, device)
    return visual_logps_padded(model, input_ids, attention_mask, tokens.to(device))


class VisualLogps(torch.nn.Module):
    """A module whose forward is :func:`visual_logps_padded` on the wrapped Janus.

    The trainer hands this to ``deepspeed.initialize`` so every training forward goes
    through the DeepSpeed engine (ZeRO-3 gathers parameters on module hooks; bf16 casting)
    while the Janus model inside stays a plain ``JanusForConditionalGeneration``.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, tokens):
        return visual_logps_padded(self.model, input_ids, attention_mask, tokens)
