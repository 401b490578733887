"""The recipe that makes the ShapesWorld Janus, the model ``configs/shapes.yaml`` runs.

    python -m ospo.shapes.pretrain --out DIR [--set key=value ...] [--vq-cache DIR]

trains, from scratch on 2 CPU cores, a tiny ``JanusForConditionalGeneration`` (the
transformers architecture a real Janus-Pro loads into: VQ tokenizer, SigLIP-style vision
encoder, Llama language model, generation head) that does every job the stages give it:

1. **tokenizer**: a byte-level BPE (:func:`ospo.tiny.build_tokenizer`) trained on the
   world's text, with Janus-Pro's special tokens and chat template;
2. **VQ** (:mod:`ospo.shapes.vq`), trained once and cached under
   ``~/.cache/ospo/shapes-vq-<hash>`` (``--vq-cache``): reused while only the language-model
   part of the recipe changes;
3. **language model**, VQ frozen. Generation rows join every ``gen_every``-th step,
   understanding rows every ``und_every``-th, text rows every ``text_every``-th, in one
   backward:

   - *generation*: prompt ids (:meth:`ospo.engine.Engine.image_prompt_ids`, the function
     stage 3 samples from) -> the VQ tokens of a rendered scene; ``uncond_frac`` of the rows
     are unconditional as classifier-free guidance needs (pads between BOS and BOI, the
     rule :func:`ospo.sampling` samples with); object cells weigh ``gen_object_weight``
     times blank cells;
   - *understanding*: the VQ reconstruction of a scene (what a generated image looks like)
     + a yes/no question in the stage-4 query (:func:`ospo.understanding.query_ids`) -> the
     evaluator's truth (" yes" / " no", balanced); and captions ("Describe the image."),
     a dense signal that teaches the vision encoder to see before yes/no can be learned
     (the shapesworld notes saw joint yes/no training stay at chance without help);
   - *text*: the stage jobs of :mod:`ospo.shapes.tasks` (write prompts, name objects,
     perturb, densify, decompose), asked with the templates of :mod:`ospo.templates` and
     answered in the labelled lines that :mod:`ospo.parsing` reads, packed into sequences
     of at most ``text_pack_len`` tokens (:func:`ospo.shapes.packing.pack_rows`);
4. **yes/no curriculum** (:func:`train_yes_no`), a second phase with a fresh optimizer:
   joint training leaves yes/no answering at chance, so presence questions (the VQ
   reconstruction of a scene + a question in the stage-4 query,
   :func:`ospo.understanding.query_ids` -> the evaluator's truth, " yes" / " no" balanced
   within each question kind) are grown one shape at a time (circle; circle, square; all
   three), then the full question mix, with generation and text rows mixed in, the rate
   decaying to 0 over the last ``yn_decay_steps`` (``Recipe.yn_*``, the measurements
   behind it there);
5. **evaluation** on held-out scenes: yes/no accuracy, and the parse rate of each stage
   job through the real parsers; the final step is the base model (fixed by the recipe,
   never picked by looking at OSPO results);
6. ``save_pretrained`` (float16 weights, float32 when loaded on CPU) + ``recipe.json``:
   the recipe hash (:func:`recipe_hash`: its settings and the source of every module that
   shapes the data or the model), settings, timings, training curves, evaluation.

Held-out scenes (:func:`ospo.shapes.grammar.heldout_scenes`) never appear in training data.
The shipped checkpoint lives in ``ospo/checkpoints/shapes-janus`` (``shapes:`` as a model
path); ``tests/test_shapes_pretrain.py`` fails when the recipe changed without a rebuild.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ospo.shapes import grammar as gr
from ospo.shapes import tasks
from ospo.shapes import vq as vqm
from ospo.shapes import world as w
from ospo.shapes.world import Group, Scene

CAPTION_TEXT = "Describe the image."
PACKAGED = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes-janus"


@dataclass
class Recipe:
    """Every setting of the recipe (all ours: the paper does not pretrain a model)."""

    seed: int = 0
    # tokenizer
    vocab_size: int = 640
    # VQ (ospo.shapes.vq)
    vq_steps: int = 200        # assigned codes (ospo.shapes.vq): 100% code agreement by ~100 steps
    vq_batch: int = 32
    vq_lr: float = 2e-3
    vq_channels: int = 32
    vq_levels: int = 4
    codebook: int = 128        # 101 distinct cells (ospo.shapes.vq.NUM_CELL_CODES) + spare codes
    # language model + vision encoder + generation head
    hidden: int = 192
    layers: int = 4
    heads: int = 6
    kv_heads: int = 2
    vision_layers: int = 3
    steps: int = 2500          # optimizer steps; measured held-out generation accuracy: 2000 -> 0.170, 3000 -> 0.618
    copy_weight: float = 2.0   # text jobs that copy from the prompt are drawn this much more often than writing
    lr: float = 1.5e-3
    min_lr_frac: float = 0.1
    warmup: int = 60
    weight_decay: float = 0.01
    gen_pool: int = 8000
    und_pool: int = 8000
    gen_rows: int = 32
    # Generation rows join every gen_every-th step, understanding rows (yes/no, captions)
    # every und_every-th, text rows every text_every-th. Measured while choosing: with the
    # generation inputs initialized at scale (init_generation_inputs), 1,000 generation-only
    # steps of 32 rows reached 54% held-out accuracy; the same 1,000 generation steps spread
    # over 2,000 steps that all carried understanding and text rows reached 5.5% (the shared
    # model learned the prompt-to-image mapping far slower), and yes/no stayed at chance
    # either way (kind-balanced 0.53 after 2,000 understanding steps; 0.51 after 500
    # understanding-only steps). So generation and text get every step, understanding every
    # other one.
    gen_every: int = 1
    und_every: int = 2
    text_every: int = 1
    # Text rows are packed (ospo.shapes.packing.pack_rows): rows of one template share its
    # instruction and worked example, written once, and sequences of at most text_pack_len
    # tokens replace one batch padded to the longest row. Same loss and gradients as the
    # padded batch (tests/test_shapes_packing.py); forward + backward of 24 rows measured
    # 0.39 s padded (3,572 tokens) vs 0.23 s packed to 256 (1,838 tokens); 0 = padded rows.
    text_pack_len: int = 256
    uncond_frac: float = 0.1
    # Phase 1's yes/no rows stay near chance through its 2,500 steps (loss 0.347-0.355, chance
    # is ln 2 / 2 = 0.347 per answer token), yet a build without them (yes_no_rows=0, record
    # docs/results/shapes-recipe-v3-build.json) learned yes/no slower in phase 2 (0.635 vs
    # 0.715 held out at its step 1,200) and ended lower (0.695 vs 0.795): they stay.
    yes_no_rows: int = 40
    caption_rows: int = 8
    text_rows: int = 24
    w_gen: float = 1.0
    # Visual tokens of object cells weigh this much more than blank cells in the generation
    # loss. With one code per cell (ospo.shapes.vq) the prompt decides only the few tokens
    # where an object starts; blank cells are nearly free to predict and, at equal weight,
    # their gradient drowned that signal: 1,000 steps at weight 1 left the model blind to its
    # prompt (teacher-forced NLL 0.134 with the right prompt, 0.134 with another scene's),
    # weight 5 did not (0.310 vs 0.323; 2,000 steps x 64 rows: 0.124 vs 0.244).
    gen_object_weight: float = 5.0
    w_yes_no: float = 1.0
    w_caption: float = 0.5
    w_text: float = 1.0
    # Phase 2, the yes/no curriculum (train_yes_no), after the joint steps with a fresh
    # optimizer. Joint training leaves yes/no at chance (0.49-0.55 held out through every
    # build) although the model reads its images (caption NLL 0.55 with the right image, 1.1-1.9
    # with another's): measured on the 2,500-step model, one fixed question ("Is there a
    # circle?") is learned in ~150 steps (0.90 held out at 200), while the same question over
    # three shapes stays at chance through 400 steps (the answer needs the question x image
    # interaction, and no part of it helps alone) and so do the full mix (300 steps) and the
    # object questions alone. Growing the question set one shape at a time
    # (yn_stage_steps each: circle; circle, square; all three) carries the learned detector
    # over: 0.85 on three-shape questions after 600 steps. Then the full question mix of
    # yes_no_question, with yn_shape_frac of presence questions kept, for yn_full_steps
    # (measured from the 2,500-step model with generation rows every 2nd step: held-out
    # yes/no 0.64 after the three stages, 0.735 / 0.78 / 0.81 / 0.775 after 225 / 450 / 525 /
    # 600 full-mix steps, still rising: 1,200, then 1,500, below). Generation rows join every
    # yn_gen_every-th step, text rows every yn_text_every-th (0: never): without text rows
    # the same run unlearned the stage jobs (objects named exactly 97.5% -> 35%,
    # densifications accepted 70% -> 0%), so they join every step as in the joint phase.
    yn_stage_steps: int = 150
    # 1,500 since 2026-12-07: from one phase 1 (--phase1), 1,200 full-mix steps ended at 0.7825
    # on the recipe's held-out questions, 1,500 at 0.83 (docs/results/shapes-recipe-2026-12-07-build.json).
    yn_full_steps: int = 1500
    yn_rows: int = 48
    yn_lr: float = 3e-4
    yn_shape_frac: float = 0.25
    # The last yn_decay_steps full-mix steps decay the learning rate linearly to 0. At the
    # constant rate, held-out yes/no wanders between checkpoints 100 steps apart (measured
    # from the 2026-12-02 model, 400 more full-mix steps: recipe evaluation 0.795 -> 0.78 /
    # 0.80 / 0.81 / 0.755, the evaluation command's questions (seed 1) 0.68 -> 0.70 / 0.705 /
    # 0.68 / 0.67); 300 steps decaying from 3e-4 to 0 rose steadily instead (0.795 / 0.81 /
    # 0.82; 0.695 / 0.71 / 0.72).
    yn_decay_steps: int = 300
    yn_gen_every: int = 2
    yn_text_every: int = 1
    eval_every: int = 200
    eval_yes_no: int = 400
    eval_text: int = 40


def recipe_hash(recipe: Recipe) -> str:
    """Settings + the source of every module that shapes the data, the model or the
    training: a checkpoint carries the hash of the recipe that made it."""
    return _hash(dataclasses.asdict(recipe))


def phase1_hash(recipe: Recipe) -> str:
    """:func:`recipe_hash` without phase 2's settings (``yn_*``): what a phase-1 snapshot
    (``--phase1``) must match to be resumed under another phase-2 setting."""
    return _hash({k: v for k, v in dataclasses.asdict(recipe).items() if not k.startswith("yn_")})


def _hash(settings: dict) -> str:
    from ospo import engine, templates, tiny, understanding
    from ospo.shapes import evaluate as ev
    from ospo.shapes import packing

    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for mod in (sys.modules[__name__], packing, tasks, vqm, w, gr, templates, tiny, understanding, engine):
        h.update(Path(mod.__file__).read_bytes())
    # the evaluator labels the yes/no data: its detection part (not its reporting) counts
    h.update(Path(ev.__file__).read_text(encoding="utf-8").split("# --- aggregation")[0].encode())
    return h.hexdigest()[:16]


def vq_hash(recipe: Recipe) -> str:
    keys = ("seed", "vq_steps", "vq_batch", "vq_lr", "vq_channels", "vq_levels", "codebook")
    h = hashlib.sha256(json.dumps({k: getattr(recipe, k) for k in keys}, sort_keys=True).encode())
    for mod in (vqm, w, gr):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


def packaged_checkpoint() -> Path:
    """The shipped ShapesWorld checkpoint (``shapes:``), or a clear error saying how to build it."""
    if not (PACKAGED / "config.json").exists():
        raise FileNotFoundError(f"the ShapesWorld checkpoint is missing from {PACKAGED}; build it with "
                                f"`python -m ospo.shapes.pretrain` (about an hour on 2 CPU cores)")
    return PACKAGED


def cache_root() -> Path:
    return Path(os.environ.get("OSPO_CACHE", Path.home() / ".cache" / "ospo"))


# --- pieces ------------------------------------------------------------------------------

def build_world_tokenizer(recipe: Recipe):
    from ospo.tiny import build_tokenizer

    extra = tasks.corpus(2000, seed=recipe.seed) + [CAPTION_TEXT]
    return build_tokenizer(vocab_size=recipe.vocab_size, extra_corpus=extra)


def model_config(recipe: Recipe, tokenizer):
    from ospo.tiny import tiny_config

    return tiny_config(tokenizer, hidden=recipe.hidden, layers=recipe.layers, heads=recipe.heads,
                       kv_heads=recipe.kv_heads, grid=w.GRID, codebook=recipe.codebook,
                       vq_channels=recipe.vq_channels, vq_levels=recipe.vq_levels,
                       vision_layers=recipe.vision_layers)


def train_or_load_vq(recipe: Recipe, cache: Path | None, progress: bool = True):
    """The recipe's VQ: from the cache when a VQ of the same settings and code exists."""
    from transformers import JanusVQVAE

    target = (cache or cache_root()) / f"shapes-vq-{vq_hash(recipe)}"
    if (target / "vq" / "config.json").exists():
        print(f"[pretrain] VQ: reusing {target}", file=sys.stderr)
        vq = JanusVQVAE.from_pretrained(target / "vq")
        return vq.eval(), json.loads((target / "vq_stats.json").read_text())
    print(f"[pretrain] VQ: training {recipe.vq_steps} steps (cached in {target})", file=sys.stderr)
    vq = vqm.build_vq(vqm.vq_config(channels=recipe.vq_channels, levels=recipe.vq_levels, codebook=recipe.codebook),
                      seed=recipe.seed)
    stats = vqm.train_vq(vq, steps=recipe.vq_steps, minutes=None, batch_size=recipe.vq_batch, lr=recipe.vq_lr,
                         seed=recipe.seed, progress=progress)
    stats["eval"] = dict(vqm.recognition(vq, n=200), code_agreement=vqm.code_agreement(vq, n=200))
    print(f"[pretrain] VQ: {stats['steps']} steps in {stats['seconds']} s, held-out scenes recognised after a "
          f"round trip: {stats['eval']['recognised']:.3f}, cells given their assigned code: "
          f"{stats['eval']['code_agreement']:.4f}", file=sys.stderr)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    vq.save_pretrained(tmp / "vq")
    (tmp / "vq_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    try:
        os.replace(tmp, target)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return vq, stats


def full_scene(layout: w.Layout) -> Scene:
    """The most specific description of a layout: every object's colour, groups by
    (shape, colour), and the scene's relation when its two groups stay two groups."""
    keys: list[tuple[str, str]] = []
    for o in layout.objects:
        if (o.shape, o.color) not in keys:
            keys.append((o.shape, o.color))
    counts = {k: sum((o.shape, o.color) == k for o in layout.objects) for k in keys}
    groups = tuple(Group(s, counts[(s, c)], c) for s, c in keys)
    rel = layout.scene.relation if layout.scene.relation is not None and len(groups) == 2 else None
    return Scene(groups, rel)


class Batcher:
    """Draws every training row of the recipe from one seeded stream.

    Images come from a pool rendered and VQ-coded once at the start (``gen_pool`` scenes
    with their tokens, ``und_pool`` scenes with their VQ reconstructions and the
    evaluator's detections on the true render): the VQ's full-resolution convolutions cost
    more per image than a training step spends on it, so each pooled image serves several
    steps, each time with another prompt wording, question or caption.
    """

    def __init__(self, engine, vq, recipe: Recipe, seed_tag: str = "train", progress: bool = True):
        from ospo.shapes.grammar import heldout_scenes

        self.e, self.vq, self.r = engine, vq, recipe
        self.rng = random.Random(f"shapes-pretrain:{recipe.seed}:{seed_tag}")
        self.exclude = heldout_scenes()
        tok = engine.tokenizer
        self.yes = tok(" yes", add_special_tokens=False)["input_ids"]
        self.no = tok(" no", add_special_tokens=False)["input_ids"]
        self._fill(progress)

    def _fill(self, progress: bool, chunk: int = 128) -> None:
        from tqdm import tqdm

        from ospo.shapes.evaluate import detect

        r = self.r
        self.gen_scenes = self.scenes(r.gen_pool)
        self.gen_tokens = torch.empty((r.gen_pool, w.GRID * w.GRID), dtype=torch.long)
        self.und_layouts = [w.sample_layout(s, self.rng) for _, s in self.scenes(r.und_pool)]
        self.und_recon = np.empty((r.und_pool, w.SIZE, w.SIZE, 3), dtype=np.uint8)
        self.und_dets = []
        bar = tqdm(total=r.gen_pool + r.und_pool, desc="data pool", unit="img", disable=not progress)
        for a in range(0, r.gen_pool, chunk):
            lay = [w.sample_layout(s, self.rng) for _, s in self.gen_scenes[a:a + chunk]]
            self.gen_tokens[a:a + len(lay)] = self.vq_tokens(w.render_batch(lay))
            bar.update(len(lay))
        for a in range(0, r.und_pool, chunk):
            imgs = w.render_batch(self.und_layouts[a:a + chunk])
            self.und_recon[a:a + len(imgs)] = reconstruct(self.vq, imgs)
            self.und_dets += [detect(im) for im in imgs]
            bar.update(len(imgs))
        bar.close()

    def scenes(self, n: int) -> list[tuple[str, Scene]]:
        return [tasks.sample_scene(self.rng, self.exclude) for _ in range(n)]

    @torch.no_grad()
    def vq_tokens(self, imgs: np.ndarray) -> torch.Tensor:
        return self.vq.encode(vqm.to_pixels(imgs), return_dict=True).image_tokens.view(len(imgs), -1)

    def generation(self) -> tuple[list[list[int]], torch.Tensor]:
        pick = [self.rng.randrange(self.r.gen_pool) for _ in range(self.r.gen_rows)]
        ids = self.e.image_prompt_ids([gr.describe(self.gen_scenes[i][1], self.rng) for i in pick])
        for i in range(len(ids)):
            if self.rng.random() < self.r.uncond_frac:   # generate()'s unconditional row
                ids[i] = [ids[i][0]] + [self.e.ids.pad] * (len(ids[i]) - 2) + [ids[i][-1]]
        return ids, self.gen_tokens[pick]

    def understanding(self) -> tuple[list[list[int]], list[int], np.ndarray, list[str]]:
        """Rows of (ids, answer start), their images (VQ reconstructions) and kinds."""
        from ospo.understanding import image_chat_ids, query_ids

        n_yn, n_cap = self.r.yes_no_rows, self.r.caption_rows
        pick = [self.rng.randrange(self.r.und_pool) for _ in range(n_yn + n_cap)]
        rows, starts, kinds = [], [], []
        for j, i in enumerate(pick):
            lay = self.und_layouts[i]
            if j < n_yn:
                q, truth, _ = yes_no_question(self.rng, lay.scene, self.und_dets[i], self.rng.random() < 0.5)
                head = query_ids(self.e, q)
                ans = (self.yes if truth else self.no) + [self.e.ids.eos]
                kinds.append("yes_no")
            else:
                head = image_chat_ids(self.e, CAPTION_TEXT)
                ans = self.e.tokenizer(" " + gr.describe(full_scene(lay), self.rng), add_special_tokens=False)["input_ids"]
                ans = ans + [self.e.ids.eos]
                kinds.append("caption")
            rows.append(head + ans)
            starts.append(len(head))
        return rows, starts, self.und_recon[pick], kinds

    def curriculum_yes_no(self, shapes: Sequence[str] | None) -> tuple[list[list[int]], list[int], np.ndarray]:
        """``yn_rows`` yes/no rows of the phase-2 curriculum (:func:`curriculum_shapes`): with
        ``shapes``, presence questions about those shapes only; without, the full mix of
        :func:`yes_no_question` with ``yn_shape_frac`` presence questions about any shape."""
        from ospo.understanding import query_ids

        rows, starts, pick = [], [], []
        while len(rows) < self.r.yn_rows:
            i = self.rng.randrange(self.r.und_pool)
            want = self.rng.random() < 0.5
            if shapes is not None or self.rng.random() < self.r.yn_shape_frac:
                q = presence_question(self.rng, self.und_dets[i], shapes or w.SHAPES, want)
                if q is None:   # every allowed shape is present (or none is): redraw
                    continue
            else:
                q, want, _ = yes_no_question(self.rng, self.und_layouts[i].scene, self.und_dets[i], want)
            head = query_ids(self.e, q)
            rows.append(head + (self.yes if want else self.no) + [self.e.ids.eos])
            starts.append(len(head))
            pick.append(i)
        return rows, starts, self.und_recon[pick]

    def text(self) -> tuple[list[list[int]], list[int]]:
        rows, starts = [], []
        while len(rows) < self.r.text_rows:
            # The copying jobs (objects, perturb, dense, decompose) are learned late: a small
            # transformer first writes the format and ignores the prompt (measured in a pilot).
            weights = [1.0 if t == "prompts" else self.r.copy_weight for t in tasks.TASKS]
            ex = tasks.example(self.rng.choices(tasks.TASKS, weights)[0], self.rng, self.exclude)
            if ex is None:
                continue
            ids, start = text_row(self.e, *ex)
            rows.append(ids)
            starts.append(start)
        return rows, starts


def yes_no_question(rng: random.Random, scene: Scene, dets, want: bool) -> tuple[str, bool, str]:
    """(question, truth, kind): a question about an image of ``scene``, true or false as ``want`` asks when the drawn
    candidates allow it: the scene's own questions, a perturbation's (the near misses stage 4
    must tell apart), or another scene's. Labels always come from the evaluator's
    detections, never from what the prompt asked.

    The question's kind (object / color / count / relation) is drawn first, uniformly among
    the kinds whose candidates hold both a true and a false question, and only then one of
    that kind with the wanted truth: drawn by truth alone, "Is there a circle?" came out
    true 84% of the time and "Is the circle red?" false 59% (the scene's own object
    questions are true, a perturbation's colours are false), and a model that read only the
    question's form scored 70% held-out without looking at the image (measured on the
    previous recipe's model: identical answers for a red circle and a blue square)."""
    from ospo.shapes.evaluate import check

    cands: list[tuple[str, bool, str]] = []
    for _ in range(8):
        r = rng.random()
        if r < 0.35:
            cand = scene
        elif r < 0.85:
            cand = tasks.perturb_scene(scene, rng.choice(["replace", "swap", "drop"]), rng) or scene
        else:
            cand = tasks.sample_scene(rng)[1]
        truth = gr.answers(cand, check(cand, dets)["requirements"])
        cands += [(q["question"], bool(t), q["kind"]) for q, t in zip(gr.questions(cand), truth)]
    kinds = sorted({k for _, t, k in cands if t} & {k for _, t, k in cands if not t})
    if kinds:
        kind = rng.choice(kinds)
        return rng.choice([c for c in cands if c[2] == kind and c[1] == want])
    return rng.choice([c for c in cands if c[1] == want] or cands)


def presence_question(rng: random.Random, dets, shapes: Sequence[str], want: bool) -> str | None:
    """"Is there a <shape>?" about one of ``shapes``, present in the image (the evaluator's
    ``dets``) when ``want``, absent otherwise; None when no allowed shape fits."""
    have = {d.shape for d in dets}
    fits = [s for s in shapes if (s in have) == want]
    return f"Is there a {rng.choice(fits)}?" if fits else None


def curriculum_shapes(step: int, r: Recipe) -> tuple[str, ...] | None:
    """The shapes phase-2 step ``step`` asks about: one more every ``yn_stage_steps`` steps
    (circle; circle, square; all), then None (the full question mix)."""
    k = step // max(1, r.yn_stage_steps)
    return tuple(w.SHAPES[:k + 1]) if k < len(w.SHAPES) else None


def text_row(engine, user_text: str, answer: str) -> tuple[list[int], int]:
    """Ids of chat(user) + " " + answer + EOS, and where the answer starts: the same string
    :meth:`ospo.engine.Engine.generate_text` builds before it samples after the label."""
    head = engine.chat(user_text)
    tok = engine.tokenizer
    h = tok(head, add_special_tokens=True)["input_ids"]
    full = tok(head + " " + answer, add_special_tokens=True)["input_ids"]
    start = 0
    while start < min(len(h), len(full)) and h[start] == full[start]:
        start += 1
    return list(full) + [engine.ids.eos], start


@torch.no_grad()
def reconstruct(vq, imgs: np.ndarray) -> np.ndarray:
    """uint8 VQ round trip (stock encode -> decode), as a generated PNG holds it."""
    out, _ = vqm.reconstruct(vq, imgs)
    return out


def lm_loss(model, rows: list[list[int]], starts: list[int], pad: int, pixel_values=None) -> torch.Tensor:
    """Mean cross-entropy of each row's answer tokens (from ``start``), rows left padded."""
    T = max(len(r) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for i, (r, s) in enumerate(zip(rows, starts)):
        off = T - len(r)
        ids[i, off:] = torch.tensor(r)
        mask[i, off:] = 1
        labels[i, off + s:] = torch.tensor(r[s:])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=pixel_values, use_cache=False)
    logits = out.logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


# --- evaluation --------------------------------------------------------------------------

def yes_no_eval_set(recipe: Recipe, n: int, vq) -> list[tuple[np.ndarray, str, bool]]:
    """Held-out scenes (never trained on), VQ-reconstructed, with balanced questions whose
    truth the evaluator reads off the true render."""
    from ospo.shapes.evaluate import detect

    held = gr.heldout_records()
    rng = random.Random(f"shapes-pretrain-eval:{recipe.seed}")
    imgs, qs = [], []
    for i in range(n):
        rec = held[i % len(held)]
        s = Scene.from_dict(rec["scene"])
        img = w.render(w.sample_layout(s, rng))
        imgs.append(img)
        qs.append(yes_no_question(rng, s, detect(img), i % 2 == 0)[:2])
    recon = reconstruct(vq, np.stack(imgs)) if imgs else []
    return [(r, q, t) for r, (q, t) in zip(recon, qs)]


@torch.no_grad()
def yes_no_eval(engine, items) -> dict:
    """Accuracy of p(yes) > p(no) through the stage-4 scorer (:func:`ospo.understanding.yes_no_probs`)."""
    from ospo.shapes.world import to_pil
    from ospo.understanding import yes_no_probs

    engine.model.eval()
    scores = yes_no_probs(engine, [to_pil(r) for r, _, _ in items], [[q] for _, q, _ in items], batch_size=64)
    pred = [sc.p_yes[0] > sc.p_no[0] for sc in scores]
    truth = [t for _, _, t in items]
    acc = float(np.mean([p == t for p, t in zip(pred, truth)]))
    return {"accuracy": acc, "n": len(items), "yes_rate": float(np.mean(pred)),
            "truth_yes_rate": float(np.mean(truth))}


@torch.no_grad()
def text_eval(engine, recipe: Recipe, n: int) -> dict:
    """Each stage job on held-out prompts, greedy, through the real parsers: the fraction
    whose output parses (and, where the grammar knows the answer, is right)."""
    from ospo import parsing, templates

    engine.model.eval()
    held = gr.heldout_records()
    rng = random.Random(f"shapes-pretrain-text:{recipe.seed}")
    pick = [held[(i * 7) % len(held)] for i in range(n)]
    out: dict[str, float] = {}
    # stage 1: write prompts (sampled at the stage's temperature, seeds fixed)
    seeds_ex = {}
    for r in gr.seed_example_records():
        seeds_ex.setdefault(r["sub_category"], []).append((r["prompt"], r["objects"]))
    subs = list(w.COVERED)
    texts = [templates.prompt_writing(subs[i % len(subs)], seeds_ex[subs[i % len(subs)]], 3) for i in range(n)]
    outs = engine.generate_text(texts, seeds=list(range(n)), prefix=templates.PROMPT_PREFIX, max_new_tokens=96,
                                temperature=1.0, top_p=0.95, batch_size=32)
    got = [parsing.parse_prompt_list(o, max_objects=3)[0] for o in outs]
    cands = [p for g in got for p, _ in g]
    out["prompts_per_request"] = float(np.mean([len(g) for g in got]))
    out["prompts_in_grammar"] = float(np.mean([gr.parse(p) is not None for p in cands])) if cands else 0.0
    out["prompts_distinct"] = len({parsing.normalize(p) for p in cands}) / max(1, len(cands))
    # stage 1: object naming
    outs = engine.generate_text([templates.object_naming(r["prompt"]) for r in pick], seeds=list(range(n)),
                                prefix=templates.OBJECTS_PREFIX, max_new_tokens=16, temperature=0.0, stop_newlines=1,
                                batch_size=32)
    out["objects_exact"] = float(np.mean([parsing.parse_objects(o, r["prompt"], max_objects=3)[0] == r["objects"]
                                          for o, r in zip(outs, pick)]))
    # stage 2: perturbation (op schedule of the stage) and densification
    ops = [templates.schedule(r["sub_category"], 3)[i % 3] for i, r in enumerate(pick)]
    outs = engine.generate_text([templates.perturbation(op, r["prompt"]) for op, r in zip(ops, pick)],
                                seeds=list(range(n)), prefix=templates.PERTURBED_PREFIX, max_new_tokens=24,
                                temperature=1.0, top_p=0.95, stop_newlines=1, batch_size=32)
    parsed = [parsing.parse_perturbation(o, r["prompt"], op)[0] for o, r, op in zip(outs, pick, ops)]
    out["perturb_valid"] = float(np.mean([p is not None for p in parsed]))
    out["perturb_in_grammar"] = float(np.mean([p is not None and gr.parse(p) is not None for p in parsed]))
    pairs = [(r, p) for r, p in zip(pick, parsed) if p is not None]
    if pairs:
        outs = engine.generate_text([templates.densification(r["prompt"], p) for r, p in pairs],
                                    seeds=list(range(len(pairs))), prefix=templates.DENSE_A_PREFIX, max_new_tokens=48,
                                    temperature=1.0, top_p=0.95, stop_newlines=2, batch_size=32)
        dense = [parsing.parse_dense(o, r["prompt"], p, r["objects"])[0] for o, (r, p) in zip(outs, pairs)]
        out["dense_valid"] = float(np.mean([d is not None for d in dense]))
        out["dense_same_scenes"] = float(np.mean([d is not None and gr.parse(d[0]) == gr.parse(r["prompt"])
                                                  and gr.parse(d[1]) == gr.parse(p)
                                                  for d, (r, p) in zip(dense, pairs)]))
    # stage 4: decomposition
    outs = engine.generate_text([templates.decomposition(r["prompt"]) for r in pick], seeds=list(range(n)),
                                prefix=templates.QUESTION_PREFIX, max_new_tokens=64, temperature=0.0,
                                stop_newlines=11, batch_size=32)
    qs = [parsing.parse_questions(o, min_questions=1, max_questions=10)[0] for o in outs]
    out["questions_valid"] = float(np.mean([q is not None for q in qs]))
    out["questions_exact"] = float(np.mean([q == [x["question"] for x in gr.questions(Scene.from_dict(r["scene"]))]
                                            for q, r in zip(qs, pick)]))
    del rng
    return {k: round(v, 4) for k, v in out.items()}


# --- training ----------------------------------------------------------------------------

def lr_at(step: int, r: Recipe) -> float:
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    t = (step - r.warmup) / max(1, r.steps - r.warmup)
    return r.lr * (r.min_lr_frac + (1 - r.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _generation_loss(model, engine, batcher: "Batcher", recipe: Recipe) -> torch.Tensor:
    """Weighted NLL of a batch of generation rows (object cells ``gen_object_weight`` x)."""
    from ospo.logps import pad_prompts, visual_logps_padded

    ids, toks = batcher.generation()
    input_ids, attn = pad_prompts(ids, engine.ids.pad)
    lp = visual_logps_padded(model, input_ids, attn, toks)
    wt = 1.0 + (recipe.gen_object_weight - 1.0) * (toks != vqm.BLANK_CODE).float()
    return -(lp * wt).sum() / wt.sum()


def yn_lr_at(step: int, total: int, r: Recipe) -> float:
    """Phase 2's rate: ``yn_lr``, decaying linearly to 0 over the last ``yn_decay_steps``."""
    left = total - step
    return r.yn_lr * min(1.0, left / r.yn_decay_steps) if r.yn_decay_steps else r.yn_lr


def _text_loss(model, engine, batcher: "Batcher", recipe: Recipe) -> torch.Tensor:
    """Mean NLL of a batch of stage-job text rows, packed when ``text_pack_len`` (same value)."""
    from ospo.shapes.packing import pack_rows, packed_lm_loss

    rows, starts = batcher.text()
    if not rows:
        return torch.zeros(())
    if recipe.text_pack_len:
        return packed_lm_loss(model, pack_rows(rows, starts, recipe.text_pack_len), engine.ids.pad, None)
    return lm_loss(model, rows, starts, engine.ids.pad)


def _optimizer(model, recipe: Recipe, lr: float):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    return params, opt


def train_lm(engine, vq, recipe: Recipe, *, progress: bool = True, batcher: "Batcher | None" = None) -> dict:
    from tqdm import tqdm

    model = engine.model
    for p in model.model.vqmodel.parameters():
        p.requires_grad_(False)
    params, opt = _optimizer(model, recipe, recipe.lr)
    batcher = batcher or Batcher(engine, vq, recipe, progress=progress)
    eval_items = yes_no_eval_set(recipe, min(recipe.eval_yes_no, 200), vq)
    hist, t0 = [], time.perf_counter()
    bar = tqdm(range(recipe.steps), desc="lm", unit="step", disable=not progress)
    for step in bar:
        model.train()
        model.model.vqmodel.eval()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, recipe)
        loss = torch.zeros(())
        rec = {"step": step + 1}
        if step % max(1, recipe.gen_every) == 0:
            gen = _generation_loss(model, engine, batcher, recipe)
            loss = loss + recipe.w_gen * gen
            rec["gen"] = round(gen.item(), 4)
        if step % max(1, recipe.und_every) == 0:
            u_rows, u_starts, recon, kinds = batcher.understanding()
            n_yn = kinds.count("yes_no")
            pv = vqm.to_pixels(recon)
            yn = lm_loss(model, u_rows[:n_yn], u_starts[:n_yn], engine.ids.pad, pv[:n_yn]) if n_yn else torch.zeros(())
            cap = (lm_loss(model, u_rows[n_yn:], u_starts[n_yn:], engine.ids.pad, pv[n_yn:])
                   if len(u_rows) > n_yn else torch.zeros(()))
            loss = loss + recipe.w_yes_no * yn + recipe.w_caption * cap
            rec.update(yes_no=round(yn.item(), 4), caption=round(cap.item(), 4))
        if step % max(1, recipe.text_every) == 0:
            txt = _text_loss(model, engine, batcher, recipe)
            loss = loss + recipe.w_text * txt
            rec["text"] = round(txt.item(), 4)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        rec.update(lr=opt.param_groups[0]["lr"], seconds=round(time.perf_counter() - t0, 1))
        if recipe.eval_every and ((step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps):
            rec["yes_no_acc"] = yes_no_eval(engine, eval_items)["accuracy"]
        hist.append(rec)
        bar.set_postfix({k: f"{rec[k]:.2f}" for k in ("gen", "yes_no", "caption", "text") if k in rec}
                        | ({"acc": rec["yes_no_acc"]} if "yes_no_acc" in rec else {}))
        if "yes_no_acc" in rec:
            print(f"[pretrain] step {rec['step']}: {json.dumps(rec)}", file=sys.stderr, flush=True)
    model.eval()
    return {"steps": recipe.steps, "seconds": round(time.perf_counter() - t0, 1), "history": hist}


def train_yes_no(engine, vq, recipe: Recipe, batcher: "Batcher", *, progress: bool = True) -> dict:
    """Phase 2, the yes/no curriculum (see ``Recipe.yn_stage_steps``): a fresh AdamW at
    ``yn_lr``, decaying to 0 over the last ``yn_decay_steps``; presence questions grown one
    shape at a time, then the full mix; generation (and optionally text) rows mixed in so
    the other jobs are kept."""
    from tqdm import tqdm

    model = engine.model
    params, opt = _optimizer(model, recipe, recipe.yn_lr)
    total = len(w.SHAPES) * recipe.yn_stage_steps + recipe.yn_full_steps
    eval_items = yes_no_eval_set(recipe, min(recipe.eval_yes_no, 200), vq) if recipe.eval_every else []
    torch.manual_seed(recipe.seed + 1)
    hist, t0 = [], time.perf_counter()
    bar = tqdm(range(total), desc="yes/no curriculum", unit="step", disable=not progress)
    for step in bar:
        model.train()
        model.model.vqmodel.eval()
        for g in opt.param_groups:
            g["lr"] = yn_lr_at(step, total, recipe)
        shapes = curriculum_shapes(step, recipe)
        rows, starts, recon = batcher.curriculum_yes_no(shapes)
        yn = lm_loss(model, rows, starts, engine.ids.pad, vqm.to_pixels(recon))
        loss = recipe.w_yes_no * yn
        rec = {"step": step + 1, "shapes": len(shapes) if shapes else "all", "yes_no": round(yn.item(), 4),
               "lr": opt.param_groups[0]["lr"]}
        if recipe.yn_gen_every and step % recipe.yn_gen_every == 0:
            gen = _generation_loss(model, engine, batcher, recipe)
            loss = loss + recipe.w_gen * gen
            rec["gen"] = round(gen.item(), 4)
        if recipe.yn_text_every and step % recipe.yn_text_every == 0:
            txt = _text_loss(model, engine, batcher, recipe)
            loss = loss + recipe.w_text * txt
            rec["text"] = round(txt.item(), 4)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at yes/no curriculum step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        if recipe.eval_every and ((step + 1) % recipe.eval_every == 0 or step + 1 == total):
            rec["yes_no_acc"] = yes_no_eval(engine, eval_items)["accuracy"]
            print(f"[pretrain] yes/no curriculum step {rec['step']}: {json.dumps(rec)}", file=sys.stderr, flush=True)
        hist.append(rec)
        bar.set_postfix({k: f"{rec[k]:.2f}" for k in ("yes_no", "gen", "text") if k in rec}
                        | ({"acc": rec["yes_no_acc"]} if "yes_no_acc" in rec else {}))
    model.eval()
    return {"steps": total, "seconds": round(time.perf_counter() - t0, 1), "history": hist}


@torch.no_grad()
def init_generation_inputs(model) -> float:
    """Give the visual tokens' input embeddings the scale of the text embeddings.

    A visual token enters the language model through ``generation_embeddings`` (dimension
    ``vq_config.embed_dim``, 8 here) and the two-layer ``generation_aligner``; with the
    default initialization (every weight N(0, 0.02)) that path shrinks them to a mean norm of
    0.002, against 0.28 for a text token, so after the first residual add a visual position
    no longer carries which token it holds. Janus-Pro's pretrained weights do not have this
    problem; a model trained from scratch must not start with it. Here the code vectors are
    drawn N(0, 1), the aligner's layers variance-preserving (std 1/sqrt(fan_in), zero bias),
    and the last layer scaled so the mean output norm equals the text embeddings'. Returns
    that norm."""
    ge, al = model.model.generation_embeddings, model.model.generation_aligner
    ge.weight.normal_(0.0, 1.0)
    layers = [al.fc1, *al.hidden_layers]
    for lin in layers:
        lin.weight.normal_(0.0, lin.in_features ** -0.5)
        if lin.bias is not None:
            lin.bias.zero_()
    target = model.get_input_embeddings().weight.norm(dim=-1).mean()
    out = model.prepare_embeddings_for_image_generation(torch.arange(ge.num_embeddings)[None])
    layers[-1].weight.mul_(target / out.norm(dim=-1).mean())
    if layers[-1].bias is not None:
        layers[-1].bias.mul_(target / out.norm(dim=-1).mean())
    return float(target)


def build(out: str | os.PathLike, recipe: Recipe | None = None, *, vq_cache: Path | None = None,
          progress: bool = True, evaluate: bool = True, threads: int = 2,
          phase1: str | os.PathLike | None = None) -> dict:
    """Run the whole recipe and write the checkpoint to ``out``. Returns ``recipe.json``'s dict.

    ``phase1``: a directory for the phase-1 snapshot (:func:`save_phase1`): written after
    phase 1 when absent, resumed from (phase 1 skipped) when present, so one phase-1 run
    (over half of the recipe's time) serves several phase-2 settings. Resuming gives the
    weights a continuous run gives (tests/test_shapes_pretrain.py), at the same thread count."""
    from transformers import JanusForConditionalGeneration

    from ospo.engine import Engine
    from ospo.tiny import make_processor, save_checkpoint

    recipe = recipe or Recipe()
    # More threads than free cores makes torch's CPU kernels wait on each other (10x slower
    # measured here with one other busy process): 1 when the machine is shared.
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    peak = _PeakRSS()
    tok = build_world_tokenizer(recipe)
    vq, vq_stats = train_or_load_vq(recipe, vq_cache, progress)
    t_vq = time.perf_counter() - t0
    torch.manual_seed(recipe.seed)
    config = model_config(recipe, tok)
    model = JanusForConditionalGeneration(config)
    init_generation_inputs(model)
    model.model.vqmodel.load_state_dict(vq.state_dict())
    model.model.vqmodel.eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[pretrain] model: {n_params / 1e6:.2f}M parameters, vocab {len(tok)}; training {recipe.steps} steps",
          file=sys.stderr)
    engine = Engine(model, make_processor(tok, config), path=str(out), device=torch.device("cpu"), dtype=torch.float32)
    batcher = Batcher(engine, model.model.vqmodel, recipe, progress=progress)
    snap = Path(phase1) / "phase1.pt" if phase1 else None
    if snap is not None and snap.exists():
        stats = load_phase1(snap, recipe, model, batcher)
        t_lm = stats["seconds"] + (time.perf_counter() - t0 - t_vq)   # the run that made it + this pool
        print(f"[pretrain] phase 1: resumed from {snap} (made in {stats['seconds']} s)", file=sys.stderr)
    else:
        stats = train_lm(engine, model.model.vqmodel, recipe, progress=progress, batcher=batcher)
        t_lm = time.perf_counter() - t0 - t_vq
        if snap is not None:
            save_phase1(snap, recipe, model, batcher, stats)
    t2 = time.perf_counter()
    yn_stats = train_yes_no(engine, model.model.vqmodel, recipe, batcher, progress=progress)
    t_yn = time.perf_counter() - t2
    result = {"recipe_hash": recipe_hash(recipe), "vq_hash": vq_hash(recipe), "recipe": dataclasses.asdict(recipe),
              "parameters": n_params, "vocab": len(tok),
              "seconds": {"vq": round(t_vq, 1), "lm": round(t_lm, 1), "yes_no_curriculum": round(t_yn, 1)},
              "vq": {k: v for k, v in vq_stats.items() if k != "history"},
              "phase1": {"hash": phase1_hash(recipe), "resumed": stats.get("resumed", False)},
              "lm_history": stats["history"], "yes_no_history": yn_stats["history"], "command": " ".join(["python -m ospo.shapes.pretrain"] + ([] if Path(out).resolve() == PACKAGED else [f"--out {out}"])
                                + [f"--set {k}={v}" for k, v in dataclasses.asdict(recipe).items()
                                   if v != getattr(Recipe(), k)])}
    if evaluate:
        t1 = time.perf_counter()
        result["eval"] = {"yes_no": yes_no_eval(engine, yes_no_eval_set(recipe, recipe.eval_yes_no, model.model.vqmodel)),
                          "text": text_eval(engine, recipe, recipe.eval_text)}
        result["seconds"]["eval"] = round(time.perf_counter() - t1, 1)
        print(f"[pretrain] eval: {json.dumps(result['eval'])}", file=sys.stderr)
    result["peak_rss_mb"] = peak.stop()
    out = Path(out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    save_checkpoint(model.half(), tok, tmp)
    (tmp / "recipe.json").write_text(json.dumps(result, indent=1) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"[pretrain] wrote {out} ({result['seconds']})", file=sys.stderr)
    return result


def save_phase1(path: Path, recipe: Recipe, model, batcher: "Batcher", stats: dict) -> None:
    """The model after phase 1 (float32), the data stream's state and phase 1's record,
    keyed by :func:`phase1_hash`; written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"phase1_hash": phase1_hash(recipe), "model": model.state_dict(),
                "rng": batcher.rng.getstate(), "stats": stats}, tmp)
    os.replace(tmp, path)
    print(f"[pretrain] phase 1: snapshot written to {path}", file=sys.stderr)


def load_phase1(path: Path, recipe: Recipe, model, batcher: "Batcher") -> dict:
    """Restore :func:`save_phase1`'s model and data stream; a snapshot of other phase-1
    settings or code is refused (never silently trained on)."""
    snap = torch.load(path, map_location="cpu", weights_only=True)
    if snap.get("phase1_hash") != phase1_hash(recipe):
        raise SystemExit(f"ospo: error: {path} holds phase 1 of another recipe (hash {snap.get('phase1_hash')}, "
                         f"this recipe's phase 1 is {phase1_hash(recipe)}): point --phase1 elsewhere or remove it")
    model.load_state_dict(snap["model"])
    v, state, gauss = snap["rng"]
    batcher.rng.setstate((v, tuple(state), gauss))
    model.eval()
    return dict(snap["stats"], resumed=True)


class _PeakRSS:
    """Peak resident memory of this process (MiB), from the kernel's own accounting."""

    def stop(self) -> float:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _parse_set(items: list[str]) -> dict:
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or k not in fields:
            raise SystemExit(f"ospo: error: --set {it!r}: expected key=value with key one of {', '.join(fields)}")
        typ = type(getattr(Recipe(), k))
        try:
            out[k] = typ(v)
        except ValueError:
            raise SystemExit(f"ospo: error: --set {it!r}: {k} takes a {typ.__name__}") from None
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ospo.shapes.pretrain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(PACKAGED), help=f"checkpoint directory (default: {PACKAGED}, the shipped one)")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="recipe settings (see Recipe); may be given more than once")
    ap.add_argument("--vq-cache", default=None, help="where trained VQs are cached (default: ~/.cache/ospo)")
    ap.add_argument("--phase1", default=None, metavar="DIR",
                    help="phase-1 snapshot: written here after phase 1, or resumed from here when it holds "
                         "this recipe's phase 1 (phase-2 settings may differ)")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 when other work shares the cores)")
    return ap


def main(argv: list[str] | None = None) -> dict:
    a = _parser().parse_args(argv)
    recipe = Recipe(**_parse_set(a.set))
    return build(a.out, recipe, vq_cache=Path(a.vq_cache) if a.vq_cache else None, evaluate=not a.no_eval, threads=a.threads,
                 phase1=a.phase1)


if __name__ == "__main__":
    main()
