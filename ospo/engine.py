"""The loaded Janus: one object that every stage talks to.

Owns a ``JanusForConditionalGeneration`` and its ``JanusProcessor``, both loaded only
through ``from_pretrained(path_or_id)`` (the special path ``tiny:`` first builds a tiny
random checkpoint on disk, then loads it the same way). Device and dtype are chosen once:
CUDA gets bfloat16, CPU float32.

What the stages need from it:

- :meth:`Engine.generate_text`: batched, chat-formatted text generation, left padded with
  an attention mask and explicit position ids, one random generator per row so that an
  item's output depends on its own seed, not on its batch neighbours' draws.
- :meth:`Engine.image_prompt_ids`: THE function that turns a prompt into the token ids that
  precede visual token 0 (chat template + ``<begin_of_image>``). Stage 3 samples from it,
  stage 5 trains on it: one function, so the two can never drift apart.
- Image sampling with mask capture (:mod:`ospo.sampling`), yes/no scoring
  (:mod:`ospo.understanding`) and teacher-forced visual log-probs (:mod:`ospo.logps`) live in
  their own modules and take an Engine.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ospo.config import ModelConfig


def pick_device(spec: str = "auto") -> torch.device:
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def pick_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, spec)


@dataclass
class TokenIds:
    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int
    image: int


class Engine:
    """A loaded Janus model + processor, with the operations the stages share."""

    def __init__(self, model, processor, *, path: str, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.path = path
        self.device = device
        self.dtype = dtype
        tok = self.tokenizer
        self.ids = TokenIds(
            bos=tok.bos_token_id,
            eos=tok.eos_token_id,
            pad=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            boi=tok.convert_tokens_to_ids(processor.image_start_token),
            eoi=tok.convert_tokens_to_ids(processor.image_end_token),
            image=tok.convert_tokens_to_ids(processor.image_token),
        )

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, cfg: ModelConfig | None = None, *, path: str | None = None) -> "Engine":
        from transformers import JanusForConditionalGeneration, JanusProcessor

        from ospo.tiny import resolve_model_path

        cfg = cfg or ModelConfig()
        spec = path or cfg.path
        resolved = resolve_model_path(spec)
        device = pick_device(cfg.device)
        dtype = pick_dtype(cfg.dtype, device)
        try:
            processor = JanusProcessor.from_pretrained(resolved)
            model = JanusForConditionalGeneration.from_pretrained(resolved, dtype=dtype)
        except OSError as e:
            raise FileNotFoundError(f"cannot load a Janus checkpoint from {spec!r}: {e}") from e
        model.to(device).eval()
        return cls(model, processor, path=resolved, device=device, dtype=dtype)

    # -- facts about the model -----------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers

    @property
    def num_image_tokens(self) -> int:
        return self.model.config.vision_config.num_image_tokens

    @property
    def grid(self) -> int:
        return int(round(self.num_image_tokens ** 0.5))

    def autocast(self):
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return nullcontext()

    # -- prompt building -----------------------------------------------------------------
    def chat(self, user_text: str, *, image: bool = False) -> str:
        """The chat-formatted text of one user turn, ending where the assistant answers."""
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": user_text}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def image_prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        """Token ids that precede visual token 0: chat template + <begin_of_image>, unpadded.

        Same text the processor builds in ``generation_mode="image"`` (it appends the BOI
        string to the chat text); stage 3 samples from these ids and stage 5 trains on them.
        """
        texts = [self.chat(p) for p in prompts]
        enc = self.tokenizer(texts, add_special_tokens=True, padding=False)
        return [list(ids) + [self.ids.boi] for ids in enc["input_ids"]]

    def left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-pad id lists; return input_ids, attention_mask, position_ids on the device."""
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.ids.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, n - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, n - len(s):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), pos.to(self.device)

    # -- text generation -----------------------------------------------------------------
    @torch.no_grad()
    def generate_text(
        self,
        user_texts: list[str],
        *,
        seeds: list[int],
        prefix: str = "",
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop_newlines: int | None = None,
        batch_size: int = 16,
        images: list | None = None,
    ) -> list[str]:
        """Answer each user text; returns ``prefix`` + the generated continuation, per row.

        ``prefix`` is forced at the start of the answer (a format label such as "Prompt:"),
        never content. Generation stops at EOS, after ``max_new_tokens``, or once the
        continuation holds ``stop_newlines`` newlines. Row i samples with its own generator
        seeded by ``seeds[i]``.
        """
        if len(seeds) != len(user_texts):
            raise ValueError("one seed per row")
        out: list[str] = []
        for start in range(0, len(user_texts), batch_size):
            out += self._generate_batch(
                user_texts[start:start + batch_size], seeds[start:start + batch_size], prefix,
                max_new_tokens, temperature, top_p, stop_newlines,
            )
        return out

    def _generate_batch(self, texts, seeds, prefix, max_new_tokens, temperature, top_p, stop_newlines):
        lead = (" " + prefix) if prefix else ""
        full = [self.chat(t) + lead for t in texts]
        enc = self.tokenizer(full, add_special_tokens=True, padding=False)["input_ids"]
        ids, mask, pos = self.left_pad(enc)
        gens = []
        for s in seeds:
            g = torch.Generator(device=self.device)
            g.manual_seed(int(s))
            gens.append(g)
        B = len(texts)
        new_tokens: list[list[int]] = [[] for _ in range(B)]
        newlines = [0] * B
        finished = [False] * B
        past = None
        step_ids, step_pos = ids, pos
        for _ in range(max_new_tokens):
            with self.autocast():
                outp = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                                  past_key_values=past, use_cache=True, logits_to_keep=1)
            past = outp.past_key_values
            logits = outp.logits[:, -1, :].float()
            nxt = sample_rows(logits, gens, temperature, top_p)
            for i in range(B):
                if finished[i]:
                    continue
                t = int(nxt[i])
                if t == self.ids.eos:
                    finished[i] = True
                    continue
                new_tokens[i].append(t)
                if stop_newlines is not None:
                    newlines[i] += self.tokenizer.decode([t]).count("\n")
                    if newlines[i] >= stop_newlines:
                        finished[i] = True
            if all(finished):
                break
            step_ids = nxt.view(B, 1).to(self.device)
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=mask.device)], dim=1)
            step_pos = step_pos[:, -1:] + 1
        return [prefix + self.tokenizer.decode(t, skip_special_tokens=True) for t in new_tokens]


def sample_rows(logits: torch.Tensor, gens: list[torch.Generator], temperature: float, top_p: float) -> torch.Tensor:
    """Sample one token per row, row i from generator i (temperature 0: greedy).

    Written here rather than taken from ``generate()`` because generate draws one random
    stream for the whole batch; per-row generators make an item's sample independent of
    which items share its batch.
    """
    if temperature <= 0:
        return logits.argmax(-1).cpu()
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(-1)
        drop = (cum - sorted_p) > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    out = torch.empty(len(gens), dtype=torch.long)
    for i, g in enumerate(gens):
        out[i] = torch.multinomial(probs[i], 1, generator=g).item()
    return out
