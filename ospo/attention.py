"""The capturing attention function: stock sdpa output, plus object-attention maps on the side.

Registered with transformers' ``AttentionInterface`` AND ``AttentionMaskInterface`` under
:data:`NAME` (without the mask registration the function silently receives ``mask=None``,
see ../shared/janus-notes.md). :func:`capturing` switches the language model (only) to it
for the duration of a ``with`` block and arms an :class:`ObjectAttentionCapture`; outside
the block the model runs its own implementation.

What a call computes:

1. The attention output, by calling transformers' own ``sdpa_attention_forward`` with the
   same arguments: the output is the stock sdpa output, bit for bit.
2. On the armed layers only, for the armed (conditional) rows only, for the last ``q_take``
   query positions only: softmax(q k^T * scale + mask) over all key columns (the normalizer
   needs them all), averaged over heads, and the probabilities on the prompt columns
   ``[0, P)`` summed into a buffer ``(rows, steps, P)`` at step ``t``. Object spans are applied
   at the end (:meth:`ObjectAttentionCapture.object_maps`): per object, the mean over its
   span tokens (every occurrence), then divided by the number of layers (mean over layers).

Handled: grouped-query heads (queries grouped per key/value head, no ``repeat_kv``), boolean
(True = attend) and additive float masks of shape ``(B, 1|H, Q, KV)``, the unused tail of a
static cache (masked out by the mask; with ``mask=None`` the sdpa rules are mirrored: a
causal prefill sees keys ``[0, Q)`` upper-left aligned, a single query sees every key), left
padding (the caller gives span columns in padded coordinates).

Two ways to record. Immediate (:meth:`ObjectAttentionCapture.record` computes in the
attention call; the teacher-forced pass, many queries per row, any cache). Deferred, for the
sampler (``deferred=True``): the attention call only keeps the captured rows' last query per
armed layer, after the forward :meth:`ObjectAttentionCapture.stash` sets them aside, and
every few steps :meth:`ObjectAttentionCapture.flush` scores the stashed steps' queries against
every armed layer's live keys in one batched matmul + softmax (the sampler's KV store keeps
those keys contiguous), each step's query masked to the keys it saw. Per decode step that is
a handful of ops instead of a dozen per layer (on the tiny CPU model the per-layer way cost
15-20% of the sampling time at grid 24), and with k steps per flush the keys are read once
per k queries instead of once per query (the matmul is one query row per head otherwise:
memory bound).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Sequence

import torch

NAME = "ospo_capture"
_STATE = threading.local()
_REGISTERED = False


def register() -> str:
    """Register :data:`NAME` with both interfaces (idempotent); returns the name."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, capture_attention_forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _REGISTERED = True
    return NAME


def active() -> "ObjectAttentionCapture | None":
    return getattr(_STATE, "capture", None)


class ObjectAttentionCapture:
    """What to record, and the buffer it is recorded into.

    Args:
        layers: decoder layer indices to average over.
        columns: per captured row, per object, the key column indices (padded coordinates,
            all inside the prompt ``[0, prompt_len)``) of the object's tokens; an empty list
            for an object not found.
        prompt_len: P, the padded prompt length (columns recorded: ``[0, P)``).
        steps: query steps to record (the number of visual tokens).
        rows: the captured batch rows are ``0 .. rows-1`` (the conditional half of a CFG
            batch laid out ``[cond; uncond]``); defaults to ``len(columns)``.

    The sampler sets :attr:`t` (the step the next forward's first recorded query belongs to)
    and :attr:`q_take` (how many trailing queries of the forward to record) before each forward.
    """

    def __init__(self, layers: Sequence[int], columns: Sequence[Sequence[Sequence[int]]], *,
                 prompt_len: int, steps: int, device=None, rows: int | None = None, deferred: bool = False):
        self.layers = sorted(set(int(i) for i in layers))
        if not self.layers:
            raise ValueError("capture needs at least one layer")
        self._layer_set = set(self.layers)
        self.columns = [[list(c) for c in row] for row in columns]
        self.rows = len(self.columns) if rows is None else rows
        if self.rows != len(self.columns):
            raise ValueError("one column list per captured row")
        self.prompt_len = int(prompt_len)
        self.steps = int(steps)
        self.device = device
        self.buf = torch.zeros((self.rows, self.steps, self.prompt_len), dtype=torch.float32, device=device)
        self.t = 0
        self.q_take = 1
        self._mask_src = self._mask_key = self._mask_add = None
        self.deferred = bool(deferred)
        self._queries: dict[int, torch.Tensor] = {}
        self._pending: list[torch.Tensor] = []  # stashed steps' queries, (Ly, R, H, 1, D) each
        self._pending_t0 = 0
        self._blocked = None
        self.seconds = 0.0  # wall time spent in record / flush / object_maps (host side)
        self._scale: float | None = None

    # called from the attention function
    def _additive_mask(self, mask, causal, R, Hkv, rep, n, Q, KV, dtype, device):
        """The mask as an additive (0 / -inf) tensor broadcastable to ``(R * Hkv, rep * n, KV)``.
        Built once per forward (every layer receives the same mask object) and reused."""
        key = (self.t, n, Q, KV, dtype, causal)  # a sampler may grow one mask in place per step
        if mask is self._mask_src and key == self._mask_key:
            return self._mask_add
        if mask is None:
            add = None
            if Q > 1 and causal:  # sdpa's is_causal: upper-left aligned over keys [0, Q)
                qi = torch.arange(Q - n, Q, device=device)[:, None]
                kj = torch.arange(KV, device=device)[None, :]
                add = torch.zeros((1, 1, n, KV), dtype=dtype, device=device).masked_fill_(~(kj <= qi), float("-inf"))
                add = add.expand(1, rep, n, KV).reshape(1, rep * n, KV)
        else:
            m = mask[:R, :, Q - n:, :KV]
            if m.dtype == torch.bool:
                add = torch.zeros(m.shape, dtype=dtype, device=device).masked_fill_(~m, float("-inf"))
            else:
                add = m.to(dtype)
            if add.shape[1] == 1:  # one mask for all heads: repeat it for the rep heads of a group
                add = add.unsqueeze(1).expand(R, Hkv, rep, n, KV)
            add = add.reshape(R * Hkv, rep * n, KV)
        self._mask_src, self._mask_key, self._mask_add = mask, key, add
        return add

    def record(self, module, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
               scaling: float | None, is_causal: bool | None) -> None:
        t0 = time.perf_counter()
        if self.deferred:  # keep the captured rows' last query; :meth:`flush` does the rest
            self._queries[module.layer_idx] = query[:self.rows, :, -1:]
            self._scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            self.seconds += time.perf_counter() - t0
            return
        self._record(module, query, key, mask, scaling, is_causal)
        self.seconds += time.perf_counter() - t0

    def _record(self, module, query, key, mask, scaling, is_causal) -> None:
        R, n = self.rows, min(self.q_take, query.shape[2])
        if self.t + n > self.steps:
            raise RuntimeError(f"capture: step {self.t} + {n} queries exceeds the {self.steps} steps armed")
        _, H, Q, D = query.shape
        Hkv = key.shape[1]
        rep = H // Hkv
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        k = key[:R]
        if mask is None and Q > 1 and causal:
            k = k[:, :, :Q]  # sdpa crops an empty static-cache tail at prefill
        KV = k.shape[2]
        # grouped-query heads: the rep query heads of a key/value head are stacked as rows, so
        # one batched matmul over (row, kv head) covers every head without repeat_kv
        q = query[:R, :, Q - n:].reshape(R * Hkv, rep * n, D)
        kt = k.reshape(R * Hkv, KV, D).transpose(1, 2)
        scale = scaling if scaling is not None else D ** -0.5
        add = self._additive_mask(mask, causal, R, Hkv, rep, n, Q, KV, q.dtype, q.device)
        s = torch.bmm(q, kt) * scale if add is None else torch.baddbmm(add, q, kt, alpha=scale)
        p = torch.softmax(s, dim=-1, dtype=torch.float32)  # (R * Hkv, rep * n, KV)
        P = min(self.prompt_len, KV)
        p = p.view(R, H, n, KV)[..., :P].sum(1)  # (R, n, P): summed over heads
        self.buf[:, self.t:self.t + n, :P].add_(p, alpha=1.0 / H)

    @property
    def pending(self) -> int:
        """Steps stashed and not yet flushed."""
        return len(self._pending)

    def stash(self) -> None:
        """Deferred mode, after one forward of a one-query-per-row decode: set step :attr:`t`'s
        queries of every armed layer aside for the next :meth:`flush` (one stack, no scoring)."""
        t0 = time.perf_counter()
        missing = [i for i in self.layers if i not in self._queries]
        if missing:
            raise RuntimeError(f"capture: no query recorded for layers {missing} (not running {NAME}?)")
        if not self._pending:
            self._pending_t0 = self.t
        elif self.t != self._pending_t0 + len(self._pending):
            raise RuntimeError(f"capture: step {self.t} stashed after steps {self._pending_t0}.."
                               f"{self._pending_t0 + len(self._pending) - 1}")
        if self.t + 1 > self.steps:
            raise RuntimeError(f"capture: step {self.t} exceeds the {self.steps} steps armed")
        self._pending.append(torch.stack([self._queries[i] for i in self.layers]))
        self._queries.clear()
        self.seconds += time.perf_counter() - t0

    def flush(self, keys: torch.Tensor, allowed: torch.Tensor) -> None:
        """Deferred mode: record every stashed step (:meth:`stash`), all armed layers at once.

        ``keys``: ``(layers, rows, Hkv, D, KV)``, the live keys of the armed layers in
        :attr:`layers` order at the last stashed step, transposed (kept so by the sampler's KV
        store: a view here); with k steps stashed from step t0 on, KV is ``prompt_len + t0 + k -
        1`` and step t0 + j saw the first ``prompt_len + t0 + j`` of them (step 0 is the
        prefill's last query, which sees the prompt). ``allowed``: ``(rows, Pm)`` bool, which of
        the first Pm key columns (the prompt, left padded) the captured rows may attend; the
        visual tokens' columns are causal. One batched matmul and one softmax over all layers and
        stashed steps.
        """
        t0 = time.perf_counter()
        self._flush(keys, allowed)
        self.seconds += time.perf_counter() - t0

    def _flush(self, keys: torch.Tensor, allowed: torch.Tensor) -> None:
        if not self._pending:
            return
        R, k, t0 = self.rows, len(self._pending), self._pending_t0
        q = (self._pending[0] if k == 1 else torch.cat(self._pending, dim=3)) * self._scale  # (Ly, R, H, k, D)
        self._pending = []
        Ly, _, H, _, D = q.shape
        Hkv, KV = keys.shape[2], keys.shape[4]
        if KV != self.prompt_len + t0 + k - 1:
            raise RuntimeError(f"capture: {KV} live keys for steps {t0}..{t0 + k - 1} "
                               f"(expected {self.prompt_len + t0 + k - 1})")
        rep = H // Hkv
        # grouped-query heads: a key/value head's rep query heads (x k steps) are rows of one matmul
        s = torch.bmm(q.reshape(Ly * R * Hkv, rep * k, D), keys[:, :R].reshape(Ly * R * Hkv, D, KV))
        s = s.view(Ly, R, H, k, KV)
        Pm = min(allowed.shape[-1], KV)
        if self._blocked is None or self._blocked[0] is not allowed:  # the sampler passes one tensor all along
            self._blocked = (allowed, ~allowed[:R, None, None, :].bool())
        s[..., :Pm].masked_fill_(self._blocked[1][..., :Pm], float("-inf"))
        if k > 1:  # step t0 + j sees the visual columns before its own: columns P + t0 + j on are hidden
            future = torch.ones((k, k - 1), dtype=torch.bool, device=s.device).triu_()
            s[..., KV - (k - 1):].masked_fill_(future, float("-inf"))
        P = min(self.prompt_len, KV)
        # a full softmax, then the prompt columns: on CPU 1.6-2x faster than exp(s - logsumexp)
        p = torch.softmax(s, dim=-1, dtype=torch.float32)[..., :P]
        self.buf[:, t0:t0 + k, :P].add_(p.sum(dim=(0, 2)), alpha=1.0 / H)

    # results
    def object_maps(self) -> list[list[torch.Tensor | None]]:
        """Per row, per object: the ``(steps,)`` map (mean over the object's tokens, heads and
        layers), or None for an object without columns."""
        t0 = time.perf_counter()
        per_layer = self.buf / len(self.layers)
        out: list[list[torch.Tensor | None]] = []
        for r, objs in enumerate(self.columns):
            row = []
            for cols in objs:
                if not cols:
                    row.append(None)
                    continue
                idx = torch.tensor(cols, dtype=torch.long, device=per_layer.device)
                row.append(per_layer[r].index_select(-1, idx).mean(-1))
            out.append(row)
        self.seconds += time.perf_counter() - t0
        return out


_SDPA = None


def capture_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                              scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """``sdpa_attention_forward`` plus, when a capture is armed on this layer, the recording."""
    global _SDPA
    if _SDPA is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        _SDPA = sdpa_attention_forward
    out = _SDPA(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                **kwargs)
    cap = active()
    if cap is not None and getattr(module, "layer_idx", None) in cap._layer_set:
        if torch.is_grad_enabled():
            with torch.no_grad():
                cap.record(module, query, key, attention_mask, scaling, is_causal)
        else:
            cap.record(module, query, key, attention_mask, scaling, is_causal)
    return out


def language_model_config(model):
    """The text (language model) config the attention layers read their implementation from."""
    return model.model.language_model.config


@contextmanager
def capturing(model, capture: ObjectAttentionCapture | None):
    """Run the language model of ``model`` with :data:`NAME` and ``capture`` armed.

    With ``capture=None`` the model is left untouched (its own attention implementation).
    The previous implementation is restored on exit, errors included.
    """
    if capture is None:
        yield None
        return
    register()
    cfg = language_model_config(model)
    old_impl = cfg._attn_implementation
    prev = active()
    cfg._attn_implementation = NAME
    _STATE.capture = capture
    try:
        yield capture
    finally:
        _STATE.capture = prev
        cfg._attn_implementation = old_impl


def default_layers(num_layers: int, skip: int) -> list[int]:
    """Layers ``[s, L - s)`` with s clamped so that at least one layer remains (OSPO sec. 3.5.2
    uses s = 5 on 24/30-layer models; a 6-layer test model with s = 5 keeps its middle)."""
    s = max(0, min(int(skip), (num_layers - 1) // 2))
    return list(range(s, num_layers - s))
