"""Batched classifier-free-guidance image sampling with object-attention capture (stage 3).

:func:`sample_images` is the loop ``JanusForConditionalGeneration.generate(generation_mode=
"image")`` runs, rewritten for three things generate does not do:

- prompts of different lengths in one batch: left padding with a correct attention mask and
  explicit position ids (generate's CFG path passes the mask but the reference DeepSeek loop
  does not);
- one random stream per image: row i draws its ``num_image_tokens`` uniforms up front from a
  ``torch.Generator`` seeded with ``seeds[i]`` and samples token t by inverse CDF
  (``searchsorted(cumsum(p), u_t)``), so an image depends on its seed only, never on its
  batch neighbours (generate draws one stream for the whole batch); temperature 0 is greedy;
- object-attention maps captured while sampling (:mod:`ospo.attention`), on the conditional
  rows, no second pass.

Layout per batch of B prompts: 2B rows ``[cond; uncond]``; an uncond row is its cond row with
every token except BOS and ``<begin_of_image>`` replaced by pad (generate's rule), same
attention mask. CFG on the generation head's logits: ``uncond + s * (cond - uncond)``
(transformers' ``ClassifierFreeGuidanceLogitsProcessor``), then temperature. The KV cache
(:class:`_KVStore`) holds P + T columns (P the padded prompt length, T the number of visual
tokens), allocated once per batch and never grown, and each step attends over the columns
written so far only. The prompt is embedded with the text
embeddings, visual tokens with ``prepare_embeddings_for_image_generation``; the language
model's last hidden state goes through ``model.model.generation_head``.

:func:`teacher_forced_maps` is the second mask source (``images.mask_source:
teacher_forced``): one causal forward over ``[x ; tokens[:-1]]`` with the same capture.
:func:`teacher_forced_cfg_logits` is the check of any sampling loop (janus-notes.md): its
argmax reproduces greedy sampling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ospo.attention import ObjectAttentionCapture, capturing
from ospo.masks import span_columns


@dataclass
class CaptureSpec:
    """What to capture for a call of :func:`sample_images`.

    ``spans[i][o]`` are the ``[start, end)`` token spans of object o in ``input_ids[i]``
    (unpadded coordinates; [] when the object is absent). ``layers``: decoder layers averaged.
    """

    layers: list[int]
    spans: list[list[list[list[int]]]]


@dataclass
class SampleResult:
    tokens: list[int]
    """The sampled visual token ids, generation order (row-major over the grid)."""
    maps: list[np.ndarray | None] | None = None
    """Per object, the soft map as a flat float32 array of length grid * grid (mean attention
    over the object's span tokens, heads and layers); None for an object without spans. None
    when nothing was captured."""


# --- helpers -----------------------------------------------------------------------------------

def _lm(engine):
    return engine.model.model.language_model


def _row_generators(seeds: Sequence[int], device) -> list[torch.Generator]:
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(s))
        gens.append(g)
    return gens


def _uncond(engine, ids: torch.Tensor) -> torch.Tensor:
    """generate's unconditional rows: pad everywhere except BOS and <begin_of_image>."""
    keep = (ids == engine.ids.bos) | (ids == engine.ids.boi)
    return torch.where(keep, ids, torch.full_like(ids, engine.ids.pad))


def _columns(spans_rows, lens, P):
    """Per row, per object: key columns in padded coordinates (left padding shifts by P - len)."""
    return [[[P - n + c for c in span_columns(obj)] for obj in row] for row, n in zip(spans_rows, lens)]


class _KVStore:
    """The sampler's KV cache: every layer's keys in one ``(L, rows, Hkv, max_len, D)`` buffer
    (values alike), allocated once per batch, plus the number of columns written.

    transformers' ``StaticLayer`` returns its whole ``max_cache_len`` buffer every step (the
    layout torch.compile and CUDA graphs need) and relies on the mask to hide the unwritten
    tail, so every decode step attends over P + T keys; ``DynamicLayer`` returns only the
    written keys but re-allocates them (``torch.cat``) every step. The layers of this store
    (:func:`_new_cache`) write in place and hand attention views of the written columns only:
    step i of T attends over P + i keys, half the static layout's work on average. One buffer
    for all layers lets the mask capture read the live keys of every armed layer as one view
    (:meth:`ospo.attention.ObjectAttentionCapture.flush`). No transformers cache class does
    this, hence these subclasses of its cache-layer API.
    """

    def __init__(self, num_layers: int, max_len: int):
        self.num_layers, self.max_len = int(num_layers), int(max_len)
        self.k = self.v = None
        self._cap = self._cap_key = None
        self._cap_len = 0

    def buffers(self, idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        if self.k is None:
            b, h, _, dk = key_states.shape
            self.k = key_states.new_zeros((self.num_layers, b, h, self.max_len, dk))
            self.v = value_states.new_zeros((self.num_layers, b, h, self.max_len, value_states.shape[-1]))
        return self.k[idx], self.v[idx]

    def live_keys(self, layers: Sequence[int], rows: int, length: int) -> torch.Tensor:
        """``(len(layers), rows, Hkv, D, length)``: the first ``rows`` rows' keys of ``layers``,
        transposed (D before positions).

        Kept in a second buffer that each call extends by the columns written since the last
        one (one per decode step), so the capture's single batched matmul reads a view: a slice
        of the main buffer cannot merge (layer, row) into one batch dimension without copying
        every key every step, and ``q @ K^T`` with K^T stored D-major runs about 2x faster on
        CPU than with a transposed view of row-major keys.
        """
        if self._cap is None or self._cap_key != (tuple(layers), rows):
            self._cap_key, self._cap_len = (tuple(layers), rows), 0
            _, _, h, m, d = self.k.shape
            self._cap = self.k.new_zeros((len(layers), rows, h, d, m))
            lo = layers[0]
            self._cap_src = (slice(lo, lo + len(layers)) if list(layers) == list(range(lo, lo + len(layers)))
                             else torch.tensor(list(layers), dtype=torch.long, device=self.k.device))
        a = self._cap_len
        if length > a:
            self._cap[..., a:length].copy_(self.k[self._cap_src, :rows, :, a:length].transpose(-1, -2))
            self._cap_len = length
        return self._cap[..., :length]


def _new_cache(engine, max_len: int):
    """A transformers ``Cache`` whose layers live in one :class:`_KVStore`; returns both."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    store = _KVStore(_lm(engine).config.num_hidden_layers, max_len)

    class StoreLayer(CacheLayerMixin):
        is_sliding = False
        is_compileable = False

        def __init__(self, idx: int):
            super().__init__()
            self.idx, self.length = idx, 0

        def lazy_initialization(self, key_states, value_states):
            self.dtype, self.device = key_states.dtype, key_states.device
            self._k, self._v = store.buffers(self.idx, key_states, value_states)
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            a, n = self.length, key_states.shape[-2]
            if a + n > store.max_len:
                raise RuntimeError(f"KV cache full: {a} + {n} > {store.max_len}")
            self._k[:, :, a:a + n].copy_(key_states)
            self._v[:, :, a:a + n].copy_(value_states)
            self.length = a + n
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]
            return self.keys, self.values

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.length + query_length, 0

        def get_seq_length(self) -> int:
            return self.length

        def get_max_length(self) -> int:
            return store.max_len

        def reset(self) -> None:
            self.length = 0

    return Cache(layers=[StoreLayer(i) for i in range(store.num_layers)]), store


def _cache_kwarg(fn) -> str:
    """The name under which ``fn`` (a language model's or a decoder layer's forward) takes the
    KV cache in this transformers version: ``cache`` from 5.24 on, ``past_key_values`` before."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _stock_llama_layers(lm) -> bool:
    """True when every decoder layer of ``lm`` is transformers' own Llama layer with its own
    forwards and no hooks, i.e. when :func:`_llama_layer_step` computes exactly what
    ``layer(...)`` computes. Anything else (another architecture, a patched or hooked module:
    DeepSpeed, accelerate offload, PEFT, hub kernels) takes the stock call."""
    from torch.nn.modules import module as nn_module
    from transformers.models.llama import modeling_llama as ml

    def hooked(mod) -> bool:
        # transformers' output-capturing hooks (installed once a forward has collected
        # attentions or hidden states, then left in place) return at once outside a collecting
        # ``LlamaModel.forward``, which a decode step never is; any other hook counts
        hooks = list(mod._forward_hooks.values()) + list(mod._forward_pre_hooks.values())
        return any(getattr(h, "__module__", "") != "transformers.utils.output_capturing" for h in hooks) \
            or "forward" in vars(mod)

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return False
    expected = [(lm.norm if hasattr(lm, "norm") else None, ml.LlamaRMSNorm)]
    for layer in lm.layers[: lm.config.num_hidden_layers]:
        if type(layer) is not ml.LlamaDecoderLayer or layer.training:  # before reading its submodules
            return False
        at, mlp = layer.self_attn, layer.mlp
        expected += [(layer, ml.LlamaDecoderLayer), (at, ml.LlamaAttention), (mlp, ml.LlamaMLP),
                     (layer.input_layernorm, ml.LlamaRMSNorm), (layer.post_attention_layernorm, ml.LlamaRMSNorm)]
        expected += [(lin, torch.nn.Linear) for lin in (at.q_proj, at.k_proj, at.v_proj, at.o_proj,
                                                       mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    return all(type(mod) is cls and not hooked(mod) for mod, cls in expected)


def _rms(eps: float, weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm.forward``, op for op: float32 statistics, the weight applied in the input
    dtype (the two casts are identities in float32 and skipped there)."""
    if h.dtype == torch.float32:
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))
    x = h.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


def _layer_params(layer) -> tuple:
    """The tensors and constants :func:`_llama_layer_step` reads, looked up once per batch
    (``nn.Module.__getattr__`` per step was a visible share of a tiny model's step)."""
    at, mlp = layer.self_attn, layer.mlp
    lin = lambda m: (m.weight, m.bias)  # noqa: E731
    return (layer.input_layernorm.variance_epsilon, layer.input_layernorm.weight, *lin(at.q_proj), *lin(at.k_proj),
            *lin(at.v_proj), *lin(at.o_proj), layer.post_attention_layernorm.variance_epsilon,
            layer.post_attention_layernorm.weight, *lin(mlp.gate_proj), *lin(mlp.up_proj), *lin(mlp.down_proj),
            mlp.act_fn, at, at.head_dim, at.scaling)


def _llama_layer_step(p: tuple, h, mask, cos, sin_signed, pos, cache_layer, attention):
    """``LlamaDecoderLayer.forward`` for a decode step, written out with the layer's own weights
    (``p``, from :func:`_layer_params`) and the ops of transformers' Llama in the same order:
    ``F.linear`` on each projection's weight and bias, the RMSNorm and SwiGLU formulas, the
    rotary embedding, the cache written through the layer's own ``update``, and attention through
    the configured attention function (so the capture still sees every armed layer). Rotary:
    ``rotate_half(q) * sin`` is ``roll(q, D/2) * sin_signed`` with the first half of ``sin``
    negated, the same products (a sign flip is exact), in 4 ops instead of 7. Why written out:
    per decode step the stock layer makes about 20 module calls and a deprecation-wrapper call;
    on a tiny model at batch 1 that Python is most of the step. Used only when
    :func:`_stock_llama_layers` holds; tests compare tokens and maps with the stock layers."""
    (eps1, wn1, wq, bq, wk, bk, wv, bv, wo, bo, eps2, wn2, wg, bg, wu, bu, wd, bd, act, attn, hd, scaling) = p
    linear = torch.nn.functional.linear
    x = _rms(eps1, wn1, h)
    shape = (*x.shape[:-1], -1, hd)
    q = linear(x, wq, bq).view(shape).transpose(1, 2)
    k = linear(x, wk, bk).view(shape).transpose(1, 2)
    v = linear(x, wv, bv).view(shape).transpose(1, 2)
    half = hd // 2
    q = (q * cos) + (torch.roll(q, half, -1) * sin_signed)
    k = (k * cos) + (torch.roll(k, half, -1) * sin_signed)
    k, v = cache_layer.update(k, v)
    o, _ = attention(attn, q, k, v, mask, dropout=0.0, scaling=scaling, position_ids=pos, use_cache=True)
    h = h + linear(o.reshape(*x.shape[:-1], -1).contiguous(), wo, bo)
    x = _rms(eps2, wn2, h)
    return h + linear(act(linear(x, wg, bg)) * linear(x, wu, bu), wd, bd)


class _DecodeStep:
    """One decode step of the language model with its per-call wrapping left out.

    ``LlamaModel.forward`` (the language model of every Janus checkpoint) per call: merges
    config defaults, installs output capturing, builds the causal mask, computes the rotary
    embedding of the step's positions, then runs the decoder layers and the final norm. For a
    decode step the mask is already a ready 4D tensor (returned as-is by ``create_causal_mask``)
    and the positions of every step are known when the batch starts, so this runs the same
    decoder layers and norm, with the same arguments, and takes the rotary embeddings of all
    T steps from one call made up front. When the layers are transformers' stock Llama layers
    (:func:`_stock_llama_layers`) each is run by :func:`_llama_layer_step`, the same ops without
    the module-call machinery; otherwise each layer is called. The outputs are those of
    ``lm(...)`` (tests compare the tokens with ``generate`` and the maps with eager attention).
    On a tiny CPU model the wrapping was a large share of a step at batch 1. Language models
    without ``layers`` / ``norm`` / ``rotary_emb`` take the plain call.
    """

    def __init__(self, lm, first_pos: torch.Tensor, steps: int, ref: torch.Tensor, cache=None):
        self.lm = lm
        self.lean = all(hasattr(lm, a) for a in ("layers", "norm", "rotary_emb"))
        self.pos = first_pos + torch.arange(steps, device=first_pos.device)[None, :]   # (rows, T)
        self.inline = False
        if self.lean:
            self.kw = _cache_kwarg(lm.layers[0].forward)
            cos, sin = lm.rotary_emb(ref, position_ids=self.pos)
            self.cos, self.sin = cos, sin
            self.layers = list(lm.layers[: lm.config.num_hidden_layers])
            self.inline = (cache is not None and hasattr(cache, "layers") and len(cache.layers) == len(self.layers)
                           and _stock_llama_layers(lm))
            if self.inline:  # per step, broadcast over heads as apply_rotary_pos_emb(unsqueeze_dim=1) does
                half = cos.shape[-1] // 2
                self.cos_h = cos.unsqueeze(1)
                self.sin_h = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1).unsqueeze(1)
                self.params = [_layer_params(layer) for layer in self.layers]
                self.norm = (lm.norm.variance_epsilon, lm.norm.weight)
                # built inside the sampler's `capturing` context: the implementation is fixed for the batch
                from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
                from transformers.models.llama.modeling_llama import eager_attention_forward

                self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(lm.config._attn_implementation,
                                                                       eager_attention_forward)

    def __call__(self, emb: torch.Tensor, mask: torch.Tensor, i: int, cache) -> torch.Tensor:
        """Last hidden state ``(rows, 1, H)`` of the visual token fed at step ``i`` (position
        ``first_pos + i``)."""
        pos = self.pos[:, i:i + 1]
        if not self.lean:
            return self.lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=True,
                           **{_cache_kwarg(self.lm.forward): cache}).last_hidden_state
        h = emb
        if self.inline:
            cos, sin = self.cos_h[:, :, i:i + 1], self.sin_h[:, :, i:i + 1]
            for p, cl in zip(self.params, cache.layers):
                h = _llama_layer_step(p, h, mask, cos, sin, pos, cl, self.attention)
            return _rms(*self.norm, h)
        pe = (self.cos[:, i:i + 1], self.sin[:, i:i + 1])
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe, use_cache=True,
                      **{self.kw: cache})
        return self.lm.norm(h)


CAPTURE_CHUNK_MAX = 16
CAPTURE_CHUNK_BYTES = 64 << 20


def capture_chunk(layers: int, rows: int, heads: int, max_len: int) -> int:
    """Decode steps scored per capture flush: as many as keep the flush's float32 scores
    ``(layers, rows, heads, k, max_len)`` under :data:`CAPTURE_CHUNK_BYTES`, at most
    :data:`CAPTURE_CHUNK_MAX`, at least 1 (Janus-Pro-7B's 20 armed layers x 32 heads, a batch
    of 16 at grid 24 with about 700 keys: 2; the tiny test model: 16)."""
    per_step = 4 * layers * rows * heads * max_len
    return max(1, min(CAPTURE_CHUNK_MAX, CAPTURE_CHUNK_BYTES // max(1, per_step)))


# --- sampling ----------------------------------------------------------------------------------

@torch.no_grad()
def sample_images(engine, input_ids: list[list[int]], seeds: list[int], *, guidance_scale: float,
                  temperature: float = 1.0, batch_size: int = 16,
                  capture: CaptureSpec | None = None, stats: dict | None = None) -> list[SampleResult]:
    """Sample one image's visual tokens per prompt (ids from :meth:`Engine.image_prompt_ids`).

    ``batch_size`` prompts per step (2 * batch_size rows with the uncond ones). With ``capture``
    each result carries its per-object soft maps. ``stats``, when given, accumulates
    ``capture_seconds``: host wall time spent in the capture code (recording queries, scoring
    them, reading the capture keys, forming the maps), measured inside this call; on a GPU
    the kernels it launches may run later, so there it is a lower bound.
    """
    if len(seeds) != len(input_ids):
        raise ValueError("one seed per prompt")
    if capture is not None and len(capture.spans) != len(input_ids):
        raise ValueError("capture.spans needs one entry per prompt")
    if guidance_scale <= 1.0:
        raise ValueError("guidance_scale must be > 1 (1 disables CFG)")
    out: list[SampleResult] = []
    for a in range(0, len(input_ids), max(1, batch_size)):
        sl = slice(a, a + max(1, batch_size))
        spans = capture.spans[sl] if capture is not None else None
        out += _sample_batch(engine, input_ids[sl], seeds[sl], guidance_scale, temperature,
                             capture.layers if capture is not None else None, spans, stats)
    return out


def _sample_batch(engine, ids_rows, seeds, guidance_scale, temperature, layers, spans_rows, stats=None):
    model = engine.model
    lm = _lm(engine)
    dev = engine.device
    T = engine.num_image_tokens
    B = len(ids_rows)
    lens = [len(r) for r in ids_rows]
    ids, mask, pos = engine.left_pad(ids_rows)
    P = ids.shape[1]
    both = torch.cat([ids, _uncond(engine, ids)], dim=0)
    mask2 = torch.cat([mask, mask], dim=0)
    # Decode steps get a ready 4D boolean mask (True = attend): one buffer, one column set per
    # step, and the view of its first P + i columns matches the cache's live keys (no
    # per-step mask construction). The prefill takes the 2D mask and transformers' own
    # causal-mask builder.
    step_mask = torch.zeros((2 * B, 1, 1, P + T), dtype=torch.bool, device=dev)
    step_mask[:, 0, 0, :P] = mask2.bool()
    step_pos = torch.cat([pos, pos], dim=0)
    next_pos = torch.tensor(lens + lens, dtype=torch.long, device=dev).unsqueeze(-1)  # position of token 0
    gens = _row_generators(seeds, dev)
    uniforms = torch.stack([torch.rand(T, generator=g, device=dev) for g in gens]) if temperature > 0 else None
    tokens = torch.zeros((B, T), dtype=torch.long, device=dev)
    cap = None
    if layers is not None:
        cap = ObjectAttentionCapture(layers, _columns(spans_rows, lens, P), prompt_len=P, steps=T, device=dev,
                                     deferred=True)
        chunk = capture_chunk(len(cap.layers), B, lm.config.num_attention_heads, P + T)
    cache, store = _new_cache(engine, P + T)
    prompt_allowed = mask[:B].bool()  # the captured rows' prompt columns (left padding masked)
    emb = model.get_input_embeddings()(both)
    head = model.model.generation_head
    with capturing(model, cap), engine.autocast():
        for i in range(T):
            if cap is not None:
                cap.t = i
            if i == 0:  # prefill: the stock call (2D mask, transformers' own causal-mask builder)
                hidden = lm(inputs_embeds=emb, attention_mask=mask2, position_ids=step_pos, use_cache=True,
                            **{_cache_kwarg(lm.forward): cache}).last_hidden_state
                decode = _DecodeStep(lm, next_pos, T - 1, hidden, cache)
            else:
                step_mask[:, :, :, P + i - 1] = True  # the visual token fed at this step
                hidden = decode(emb, step_mask[..., :P + i], i - 1, cache)
            if cap is not None:  # the captured rows' last query, scored every `chunk` steps
                cap.stash()
                if cap.pending == chunk or i == T - 1:
                    t0 = time.perf_counter()
                    keys = store.live_keys(cap.layers, B, P + i)
                    cap.seconds += time.perf_counter() - t0
                    cap.flush(keys, prompt_allowed)
            logits = head(hidden[:, -1, :]).float()
            cond, unc = logits[:B], logits[B:]
            guided = unc + (cond - unc) * guidance_scale
            if temperature > 0:
                probs = torch.softmax(guided / temperature, dim=-1)
                cdf = probs.cumsum(-1)
                nxt = torch.searchsorted(cdf, uniforms[:, i:i + 1].contiguous(), right=True).squeeze(-1)
                nxt = nxt.clamp_(max=guided.shape[-1] - 1)
            else:
                nxt = guided.argmax(-1)
            tokens[:, i] = nxt
            if i + 1 < T:
                emb = model.prepare_embeddings_for_image_generation(torch.cat([nxt, nxt]).unsqueeze(-1))
    toks = tokens.cpu().tolist()
    if cap is None:
        return [SampleResult(tokens=t) for t in toks]
    maps = cap.object_maps()
    if stats is not None:
        stats["capture_seconds"] = stats.get("capture_seconds", 0.0) + cap.seconds
    return [SampleResult(tokens=t, maps=[None if m is None else m.float().cpu().numpy().astype(np.float32)
                                         for m in row]) for t, row in zip(toks, maps)]


# --- teacher-forced passes -----------------------------------------------------------------------

def _teacher_forced_inputs(engine, input_ids, tokens, *, cfg: bool):
    model = engine.model
    T = len(tokens[0])
    ids, mask, pos = engine.left_pad(input_ids)
    B, P = ids.shape
    if cfg:
        ids = torch.cat([ids, _uncond(engine, ids)], dim=0)
        mask = torch.cat([mask, mask], dim=0)
        pos = torch.cat([pos, pos], dim=0)
        tokens = list(tokens) + list(tokens)
    tok = torch.tensor([list(t) for t in tokens], dtype=torch.long, device=engine.device)
    text = model.get_input_embeddings()(ids)
    vis = model.prepare_embeddings_for_image_generation(tok[:, :-1]) if T > 1 else text[:, :0]
    emb = torch.cat([text, vis.to(text.dtype)], dim=1)
    n = ids.shape[0]
    full_mask = torch.cat([mask, torch.ones((n, T - 1), dtype=mask.dtype, device=mask.device)], dim=1)
    lens = mask.sum(-1, keepdim=True)
    vis_pos = lens + torch.arange(T - 1, device=mask.device)[None, :]
    full_pos = torch.cat([pos, vis_pos], dim=1)
    return emb, full_mask, full_pos, P, T, B


@torch.no_grad()
def teacher_forced_maps(engine, input_ids: list[list[int]], tokens: list[list[int]],
                        spans: list[list[list[list[int]]]], layers: Sequence[int], *,
                        batch_size: int = 8) -> list[list[np.ndarray | None]]:
    """Per row, per object: soft maps from one forward over ``[x ; tokens[:-1]]`` (conditional
    rows only: the uncond rows of CFG do not change a cond row's attention). The query at
    position P - 1 + t predicts token t, so its attention is token t's map."""
    out: list[list[np.ndarray | None]] = []
    lm = _lm(engine)
    for a in range(0, len(input_ids), max(1, batch_size)):
        ids_rows, tok_rows, sp = input_ids[a:a + batch_size], tokens[a:a + batch_size], spans[a:a + batch_size]
        emb, mask, pos, P, T, B = _teacher_forced_inputs(engine, ids_rows, tok_rows, cfg=False)
        cap = ObjectAttentionCapture(layers, _columns(sp, [len(r) for r in ids_rows], P), prompt_len=P, steps=T,
                                     device=engine.device)
        cap.t, cap.q_take = 0, T
        with capturing(engine.model, cap), engine.autocast():
            lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=False)
        out += [[None if m is None else m.float().cpu().numpy().astype(np.float32) for m in row]
                for row in cap.object_maps()]
    return out


@torch.no_grad()
def teacher_forced_cfg_logits(engine, input_ids: list[list[int]], tokens: list[list[int]], *,
                              guidance_scale: float) -> torch.Tensor:
    """CFG logits ``(B, T, V)`` of every visual token from one forward over ``[x ; tokens[:-1]]``
    (cond and uncond rows): what the sampling loop saw at each step."""
    emb, mask, pos, P, T, B = _teacher_forced_inputs(engine, input_ids, tokens, cfg=True)
    with engine.autocast():
        h = _lm(engine)(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    logits = engine.model.model.generation_head(h[:, P - 1:, :]).float()
    cond, unc = logits[:B], logits[B:]
    return unc + (cond - unc) * guidance_scale


# --- decoding ----------------------------------------------------------------------------------

@torch.no_grad()
def decode_images(engine, tokens: list[list[int]], *, batch_size: int = 16) -> list:
    """PIL images from visual token ids: ``model.decode_image_tokens`` (VQ decoder), then the
    processor's ``postprocess`` (pixels in [-1, 1] -> uint8)."""
    from PIL import Image

    out = []
    for a in range(0, len(tokens), batch_size):
        t = torch.tensor(tokens[a:a + batch_size], dtype=torch.long, device=engine.device)
        with engine.autocast():
            pix = engine.model.decode_image_tokens(t).float().cpu()  # (N, H, W, 3), about [-1, 1]
        try:
            imgs = engine.processor.postprocess(list(pix.permute(0, 3, 1, 2)), return_tensors="PIL.Image.Image")
            imgs = imgs["pixel_values"] if isinstance(imgs, dict) or hasattr(imgs, "keys") else imgs
            if not all(isinstance(im, Image.Image) for im in imgs):
                raise TypeError("postprocess did not return PIL images")
        except Exception:  # noqa: BLE001 - processor versions differ; same arithmetic by hand
            arr = ((pix.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
            imgs = [Image.fromarray(x) for x in arr]
        out += list(imgs)
    return out
