"""Stage 5: object-weighted SimPO + SFT on the stored visual tokens (OSPO sec. 3.7).

Reads ``pairs.jsonl`` (stage 4): per kept pair the ORIGINAL prompt x and the chosen and
rejected images' exact sampled visual tokens and object masks (inline lists, or a path
relative to the work directory to a ``.npy``/``.npz``/``.json`` file). Never re-encodes
PNGs. The prompt is rebuilt with :meth:`ospo.engine.Engine.image_prompt_ids`, the function
stage 3 sampled from.

Per micro-batch, chosen and rejected rows go through ONE concatenated teacher-forced
forward (:mod:`ospo.logps`), then

    loss = ObjSimPO(chosen, rejected; alpha, beta, gamma, variant) + sft_weight * SFT(chosen)
           [+ sft_uncond_weight * SFT(chosen | unconditional prompt)   (ours; 0 by default)]

(``train.loss=simpo`` sets alpha = 0; ``train.loss=sft`` trains the SFT term alone;
``train.sft_weight=0`` turns SFT off: the paper's loss ablations). AdamW, cosine schedule
with linear warmup down to ``min_learning_rate``, gradient clipping (defaults: the public
code's). Vision encoder, its aligner and the VQ model are frozen; the language model,
generation embeddings/aligner/head train (or LoRA adapters on the language model's
projections, merged when saved).

Engines: plain torch by default; DeepSpeed when ``train.deepspeed`` names a JSON config
(``configs/deepspeed/zero2.json``/``zero3.json``; its ``"auto"`` values are filled from
``train.*``). A lone process (tests, a laptop) becomes rank 0 of a 1-rank gloo group;
under ``deepspeed``/``torchrun``/``accelerate launch`` each rank trains on its share of
every global batch::

    deepspeed --num_gpus 8 -m ospo.run --stage train --config configs/janus-pro-1b.yaml
    torchrun --nproc_per_node 8 -m ospo.run --stage train --config configs/janus-pro-7b.yaml

Outputs in ``iter_XX/``:

- ``train_log.jsonl``: one record per optimizer step (ledger id ``step-000001``...) with
  ``loss/total``, ``loss/simpo``, ``loss/sft``, ``rewards/chosen``, ``rewards/rejected``,
  ``rewards/margins``, ``rewards/accuracy``, ``logps/chosen``, ``logps/rejected``,
  ``loss/sft_uncond`` (0 unless ``train.sft_uncond_weight`` > 0), ``lr``,
  ``grad_norm``, ``pairs_per_s`` (also to TensorBoard under ``tensorboard/`` when installed).
- ``train_state/``: resumable state every ``save_every`` steps (trainable weights,
  optimizer, scheduler, step, RNG; DeepSpeed's own checkpoint under DeepSpeed). The data
  order is a function of (run seed, iteration, epoch), so a killed run resumed from here
  reproduces the uninterrupted losses.
- ``checkpoint/``: ``save_pretrained`` of model + processor (+ generation config), written
  to a temporary directory and renamed into place; loadable by
  ``JanusForConditionalGeneration.from_pretrained``.

Bad input stops the stage with :class:`StageError`: an empty ``pairs.jsonl``; a pair whose
tokens or mask do not fit the model; a non-finite loss or gradient norm (the pair ids of the
step are named; nothing is written over the last good ``train_state``/``checkpoint``).

After training the model goes back to eval mode and replaces the one in memory, so the next
iteration samples with it (under ZeRO-3 the engine is dropped and reloads from the
checkpoint, whose path becomes ``get_engine.source``).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ospo import dist
from ospo.logps import VisualLogps, pad_prompts
from ospo.losses import obj_simpo_loss, sft_loss, smooth_masks
from ospo.rundir import StageError, atomic_write_json, derive_seed, read_jsonl, require_input

LOG = "train_log.jsonl"
# Target modules for LoRA: the projections of transformers' Janus language model (LLaMA).
LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
METRICS = ("loss/total", "loss/simpo", "loss/sft", "rewards/chosen", "rewards/rejected", "rewards/margins",
           "rewards/accuracy", "logps/chosen", "logps/rejected", "loss/sft_uncond")


def _after_step(step: int) -> None:
    """Called after each optimizer step is logged (tests patch it to simulate a crash)."""


# --- data ---------------------------------------------------------------------------------

@dataclass
class PairData:
    ids: list[str]                 # "<id>/k<k>": unique per pair even with vqa.select=all
    prompt_ids: list[list[int]]    # original prompt x, through Engine.image_prompt_ids
    chosen_tokens: torch.Tensor    # [n, N] long
    rejected_tokens: torch.Tensor
    chosen_mask: torch.Tensor      # [n, N] float, row-major (generation order)
    rejected_mask: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)


def _array(value, rundir, what: str, pid: str) -> np.ndarray:
    """An inline (possibly nested) list, or a path relative to the work directory."""
    if isinstance(value, str):
        p = rundir.abs(value) if rundir is not None else Path(value)
        if not p.exists():
            raise StageError(f"train: pair {pid}: {what} file {p} does not exist")
        if p.suffix == ".npy":
            return np.load(p)
        if p.suffix == ".npz":
            with np.load(p) as z:
                key = what if what in z.files else z.files[0]
                return z[key]
        return np.asarray(json.loads(p.read_text()))
    if value is None:
        raise StageError(f"train: pair {pid} has no {what}")
    return np.asarray(value)


def load_pairs(records: list[dict], engine, rundir=None, *, mask_smoothing: float = 0.0) -> PairData:
    """Tensors for the records of ``pairs.jsonl``; a pair that does not fit the model raises."""
    n_tok = engine.num_image_tokens
    codebook = engine.model.config.vq_config.num_embeddings
    ids, prompts, tok, msk = [], [], {"chosen": [], "rejected": []}, {"chosen": [], "rejected": []}
    for r in records:
        pid = f"{r['id']}/k{r.get('k', 0)}"
        for side in ("chosen", "rejected"):
            d = r.get(side) or {}
            t = _array(d.get("tokens"), rundir, "tokens", pid).reshape(-1).astype(np.int64)
            m = _array(d.get("mask"), rundir, "mask", pid).reshape(-1).astype(np.float32)
            if t.size != n_tok or m.size != n_tok:
                raise StageError(f"train: pair {pid} ({side}) has {t.size} tokens and a {m.size}-cell mask; "
                                 f"the model generates {n_tok} (grid {engine.grid}x{engine.grid})")
            if t.min() < 0 or t.max() >= codebook:
                raise StageError(f"train: pair {pid} ({side}) has tokens outside the codebook [0, {codebook})")
            tok[side].append(torch.from_numpy(t))
            msk[side].append(torch.from_numpy(m))
        ids.append(pid)
        prompts.append(r["prompt"])
    cm, rm = torch.stack(msk["chosen"]), torch.stack(msk["rejected"])
    if mask_smoothing > 0:
        cm, rm = smooth_masks(cm, mask_smoothing, engine.grid), smooth_masks(rm, mask_smoothing, engine.grid)
    return PairData(ids, engine.image_prompt_ids(prompts), torch.stack(tok["chosen"]),
                    torch.stack(tok["rejected"]), cm, rm)


def total_steps(tc, n_pairs: int, world: int) -> int:
    per_step = tc.micro_batch_size * tc.grad_accum * world
    return max(1, min(tc.max_steps, math.floor(tc.epochs * n_pairs / per_step)))


def unconditional_prompt(prompt_ids: list[int], pad: int) -> list[int]:
    """The unconditional row of a prompt that ends in ``<begin_of_image>``: pad everywhere but
    its first token (BOS) and its last, the rule generate() and :mod:`ospo.sampling` sample
    the guidance rows with (same length, every position attended)."""
    if len(prompt_ids) < 2:
        return list(prompt_ids)
    return [prompt_ids[0]] + [pad] * (len(prompt_ids) - 2) + [prompt_ids[-1]]


# --- the trainer --------------------------------------------------------------------------

class NonFiniteLoss(StageError):
    pass


class Trainer:
    """Optimizer, schedule and (optionally) DeepSpeed around an Engine's model.

    ``concat=False`` runs chosen and rejected as two forwards (benchmarks only).
    """

    def __init__(self, cfg, engine, data: PairData, *, iteration: int = 0, concat: bool = True):
        self.cfg, self.tc, self.engine, self.data = cfg, cfg.train, engine, data
        self.iteration, self.concat = iteration, concat
        self.world, self.rank = dist.world_size(), dist.rank()
        self.device = engine.device
        self.ds = None
        self._perms: dict[int, torch.Tensor] = {}

    # -- setup --
    def setup(self, steps: int) -> None:
        tc = self.tc
        self.steps = steps
        cuda = self.device.type == "cuda"
        self.bf16 = tc.bf16 == "true" or (tc.bf16 == "auto" and cuda)
        model = self.engine.model
        self.orig_dtype = next(model.parameters()).dtype
        for p in model.parameters():
            p.requires_grad_(False)
        m = model.model
        for mod in (m.language_model, m.generation_embeddings, m.generation_aligner, m.generation_head):
            for p in mod.parameters():
                p.requires_grad_(True)
        if tc.lora:
            model = self._apply_lora(model)
        if tc.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        for frozen in (m.vision_model, m.aligner, m.vqmodel):
            frozen.eval()
        self.model = model
        if tc.deepspeed is None and self.orig_dtype != torch.float32:
            model.float()  # fp32 master weights; bf16 through autocast below
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2),
                                           weight_decay=tc.weight_decay)
        from transformers import get_cosine_with_min_lr_schedule_with_warmup

        self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            self.optimizer, num_warmup_steps=math.ceil(tc.warmup_ratio * steps), num_training_steps=steps,
            min_lr=tc.min_learning_rate)
        # PEFT injects the adapters into the Janus modules in place: run the Janus itself.
        self.module = VisualLogps(model.get_base_model() if tc.lora else model)
        if tc.deepspeed is not None:
            self._setup_deepspeed()

    def _apply_lora(self, model):
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise StageError("train.lora=true needs peft (pip install 'ospo[lora]')") from None
        lcfg = LoraConfig(r=self.tc.lora_r, lora_alpha=self.tc.lora_alpha, lora_dropout=0.0,
                          target_modules=LORA_TARGETS, bias="none")
        return get_peft_model(model, lcfg)

    def _setup_deepspeed(self) -> None:
        dist.ensure_process_group_env()
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if self.device.type == "cuda" else "cpu")
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        self.world, self.rank = dist.world_size(), dist.rank()
        ds_cfg = deepspeed_config(self.tc.deepspeed, self.tc, self.world, self.bf16, self.device)
        self.zero_stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=ds_cfg)

    # -- data order: a pure function of (seed, iteration, epoch, position) --
    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, "train", self.iteration, epoch) % (2 ** 63))
            self._perms = {epoch: torch.randperm(len(self.data), generator=g)}
        return self._perms[epoch]

    def micro_indices(self, step: int, micro: int) -> list[int]:
        """Pair indices of this rank's micro-batch ``micro`` of optimizer step ``step`` (1-based)."""
        b, n = self.tc.micro_batch_size, len(self.data)
        g = ((step - 1) * self.tc.grad_accum + micro) * self.world * b + self.rank * b
        return [int(self._perm((g + j) // n)[(g + j) % n]) for j in range(b)]

    # -- one optimizer step --
    def _logps(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Log-probs of the chosen and rejected tokens under their prompt, and (when
        ``sft_uncond_weight`` > 0) of the chosen tokens under the unconditional prompt."""
        d, dev = self.data, self.device
        prompts = [d.prompt_ids[i] for i in idx]
        uncond = [unconditional_prompt(p, self.engine.ids.pad) for p in prompts] if self.tc.sft_uncond_weight > 0 else []
        fwd = self.ds if self.ds is not None else self.module
        amp = (torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 and self.ds is None and dev.type == "cuda"
               else nullcontext())
        with amp:
            n = len(idx)
            if self.concat:
                ids, mask = pad_prompts(prompts + prompts + uncond, self.engine.ids.pad, dev)
                toks = torch.cat([d.chosen_tokens[idx], d.rejected_tokens[idx]] + ([d.chosen_tokens[idx]] if uncond else []))
                lp = fwd(ids, mask, toks.to(dev))
                return lp[:n], lp[n:2 * n], (lp[2 * n:] if uncond else None)
            ids, mask = pad_prompts(prompts, self.engine.ids.pad, dev)
            lp_u = None
            if uncond:
                u_ids, u_mask = pad_prompts(uncond, self.engine.ids.pad, dev)
                lp_u = fwd(u_ids, u_mask, d.chosen_tokens[idx].to(dev))
            return fwd(ids, mask, d.chosen_tokens[idx].to(dev)), fwd(ids, mask, d.rejected_tokens[idx].to(dev)), lp_u

    def step(self, step: int) -> dict:
        tc, d = self.tc, self.data
        sums = dict.fromkeys(METRICS, 0.0)
        step_ids: list[str] = []
        alpha = 0.0 if tc.loss == "simpo" else tc.alpha
        lr = float(self.scheduler.get_last_lr()[0])  # the rate this step's update uses
        for micro in range(tc.grad_accum):
            idx = self.micro_indices(step, micro)
            step_ids += [d.ids[i] for i in idx]
            lp_w, lp_l, lp_u = self._logps(idx)
            cm, rm = d.chosen_mask[idx].to(lp_w.device), d.rejected_mask[idx].to(lp_w.device)
            losses, r_w, r_l = obj_simpo_loss(lp_w, lp_l, cm, rm, alpha=alpha, beta=tc.beta, gamma=tc.gamma,
                                              variant=tc.variant)
            sft = sft_loss(lp_w)
            per_ex = sft if tc.loss == "sft" else losses + tc.sft_weight * sft
            sft_u = sft_loss(lp_u) if lp_u is not None else torch.zeros_like(sft)
            if lp_u is not None:
                per_ex = per_ex + tc.sft_uncond_weight * sft_u
            self._check_finite(step, [d.ids[i] for i in idx], per_ex)
            total = per_ex.mean()
            if self.ds is not None:
                self.ds.backward(total)  # DeepSpeed divides by the accumulation steps itself
                self.ds.step()           # applies at the accumulation boundary only
            else:
                (total / tc.grad_accum).backward()
            with torch.no_grad():
                vals = (total, losses.mean(), sft.mean(), r_w.mean(), r_l.mean(), (r_w - r_l).mean(),
                        (r_w > r_l).float().mean(), lp_w.mean(), lp_l.mean(), sft_u.mean())
                for k, v in zip(METRICS, vals):
                    sums[k] += float(v) / tc.grad_accum
        if self.ds is not None:
            gn = self.ds.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None else float("nan")
            if gn is not None and not math.isfinite(grad_norm):
                raise NonFiniteLoss(f"train: non-finite gradient norm at step {step}; pairs of the step: "
                                    f"{', '.join(sorted(set(step_ids)))}; nothing saved over the last good state")
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip if tc.grad_clip > 0 else float("inf")))
            if not math.isfinite(grad_norm):
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLoss(f"train: non-finite gradient norm at step {step}; pairs of the step: "
                                    f"{', '.join(sorted(set(step_ids)))}")
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        out = dict(zip(METRICS, dist.all_reduce_mean([sums[k] for k in METRICS], self.device)))
        out.update({"lr": lr, "grad_norm": grad_norm})
        return out

    def _check_finite(self, step: int, ids: list[str], per_ex: torch.Tensor) -> None:
        bad = [ids[i] for i in torch.nonzero(~torch.isfinite(per_ex.detach())).flatten().tolist()]
        everyone = [x for part in dist.all_gather_object(bad) for x in part]
        if everyone:
            if self.ds is None:
                self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"train: non-finite loss at step {step} for pair(s) {', '.join(sorted(set(everyone)))}; "
                                "stopped before the update, nothing saved over the last good state")

    # -- resumable state --
    def save_state(self, path: Path, step: int, meta: dict) -> None:
        """Write the training state to ``path`` atomically (temporary directory, then rename)."""
        tmp = path.with_name(f".{path.name}.tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        rng = _rng_state()
        if self.ds is not None:
            self.ds.save_checkpoint(str(tmp), tag="state", client_state={"step": step, "rng": rng})
        elif self.rank == 0:
            trainable = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}
            torch.save({"step": step, "trainable": trainable, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "rng": rng}, tmp / "state.pt")
        dist.barrier()
        if self.rank == 0:
            atomic_write_json(tmp / "meta.json", {"step": step, **meta})
            _swap_dir(tmp, path)
        dist.barrier()

    def load_state(self, path: Path) -> int:
        if self.ds is not None:
            _, client = self.ds.load_checkpoint(str(path), tag="state", load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
            step, rng = client["step"], client["rng"]
        else:
            st = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
            named = dict(self.model.named_parameters())
            with torch.no_grad():
                for n, t in st["trainable"].items():
                    named[n].copy_(t.to(named[n].dtype))
            self.optimizer.load_state_dict(st["optimizer"])
            self.scheduler.load_state_dict(st["scheduler"])
            step, rng = st["step"], st["rng"]
        _set_rng_state(rng)
        return int(step)

    # -- the result --
    def final_model(self):
        """The trained ``JanusForConditionalGeneration`` (LoRA merged), in eval mode."""
        model = self.model
        if self.tc.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        if self.tc.lora:
            model = model.merge_and_unload()
        model.eval()
        if self.ds is None and self.orig_dtype != torch.float32:
            model.to(self.orig_dtype)
        model.zero_grad(set_to_none=True)
        return model

    def save_checkpoint(self, path: Path, model) -> None:
        """``save_pretrained`` of model + processor into ``path``, atomically (rank 0 writes)."""
        state_dict = None
        if self.ds is not None and self.zero_stage == 3:
            full = self.ds._zero3_consolidated_16bit_state_dict()  # collective: every rank
            if self.rank == 0:
                state_dict = {k[len("model."):] if k.startswith("model.") else k: v for k, v in full.items()}
        if self.rank == 0:
            tmp = path.with_name(f".{path.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, state_dict=state_dict)
            self.engine.processor.save_pretrained(tmp)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(tmp)
            _swap_dir(tmp, path)
        dist.barrier()

    def close(self) -> None:
        if self.ds is not None and hasattr(self.ds, "destroy"):
            self.ds.destroy()
        self.ds = self.optimizer = self.scheduler = None


def deepspeed_config(path: str, tc, world: int, bf16: bool, device) -> dict:
    """Load a DeepSpeed JSON and fill its ``"auto"`` values from ``train.*``."""
    p = Path(path)
    if not p.exists():
        pkg = Path(__file__).resolve().parent.parent / "configs" / path
        if pkg.exists():
            p = pkg
        else:
            raise StageError(f"train.deepspeed: {path} does not exist")
    cfg = json.loads(p.read_text())
    if "optimizer" in cfg or "scheduler" in cfg:
        raise StageError(f"train.deepspeed: {p} defines an optimizer/scheduler; ospo builds them from train.* "
                         "(remove those sections)")
    fill = {"train_micro_batch_size_per_gpu": tc.micro_batch_size, "gradient_accumulation_steps": tc.grad_accum,
            "train_batch_size": tc.micro_batch_size * tc.grad_accum * world, "gradient_clipping": tc.grad_clip}
    for k, v in fill.items():
        if cfg.get(k, "auto") == "auto":
            cfg[k] = v
    for k, on in (("bf16", bf16), ("fp16", False)):
        sec = cfg.setdefault(k, {})
        if sec.get("enabled", "auto") == "auto":
            sec["enabled"] = on
    cfg.setdefault("zero_allow_untested_optimizer", True)
    if device.type != "cuda":
        # CPU (tests): no CUDA streams to overlap communication on.
        cfg.get("zero_optimization", {})["overlap_comm"] = False
    left = [k for k, v in _walk(cfg) if v == "auto"]
    if left:
        raise StageError(f"train.deepspeed: {p}: cannot fill 'auto' for {', '.join(left)}")
    return cfg


def _walk(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _swap_dir(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp``: at every instant one complete version is on disk."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _state_dir(stage_dir: Path) -> Path | None:
    """The last complete training state (a crash mid-swap leaves it under ``.old``)."""
    for cand in (stage_dir / "train_state", stage_dir / ".train_state.old"):
        if (cand / "meta.json").exists():
            return cand
    return None


# --- the stage ----------------------------------------------------------------------------

def run(cfg, rundir, iteration, get_engine, *, force=False, limit=None) -> dict:
    stage = rundir.stage(iteration, "train", cfg.stage_view("train"), force=force)
    tc = cfg.train
    ckpt = stage.dir / "checkpoint"
    records = require_input(stage.dir / "pairs.jsonl", "vqa", "train")
    if limit is not None:
        records = records[:limit]
    if not records:
        raise StageError(f"train: {stage.dir / 'pairs.jsonl'} holds no pairs (stage 4 kept none): "
                         "nothing to train on; the loop stops here")
    m = stage.read_manifest()
    if m and m.get("finished") and (ckpt / "config.json").exists():
        print(f"[train] iter_{iteration:02d} already trained: {ckpt}")
        if hasattr(get_engine, "engine"):
            get_engine.engine = None  # what is in memory is the untrained model: reload
        if hasattr(get_engine, "source"):
            get_engine.source = str(ckpt)
        return m

    engine = get_engine()
    data = load_pairs(records, engine, rundir, mask_smoothing=tc.mask_smoothing)
    trainer = Trainer(cfg, engine, data, iteration=iteration)
    steps = total_steps(tc, len(data), dist.world_size())
    trainer.setup(steps)
    steps = total_steps(tc, len(data), trainer.world)  # DeepSpeed may have just formed the group
    meta = {"config_hash": stage.hash, "pairs": len(data), "total_steps": steps, "world_size": trainer.world}

    start = 0
    sd = _state_dir(stage.dir)
    if sd is not None:
        saved = json.loads((sd / "meta.json").read_text())
        if all(saved.get(k) == v for k, v in meta.items()):
            start = trainer.load_state(sd)
            print(f"[train] resuming iter_{iteration:02d} at step {start}/{steps} from {sd}")
        else:
            print(f"[train] ignoring {sd}: made for {{{', '.join(f'{k}: {saved.get(k)}' for k in meta)}}}")

    stage.extra.pop("stopped", None)
    writer = _tensorboard(stage.dir) if dist.is_main() else None
    pairs_per_step = tc.micro_batch_size * tc.grad_accum * trainer.world
    last: dict = {}
    try:
        with tqdm(total=steps, initial=start, desc=f"train iter_{iteration:02d}", unit="step",
                  disable=not dist.is_main()) as bar:
            for step in range(start + 1, steps + 1):
                t0 = time.time()
                try:
                    metrics = trainer.step(step)
                except NonFiniteLoss as e:
                    print(f"[train] {e}", file=sys.stderr)
                    if dist.is_main():
                        stage.extra["stopped"] = {"step": step, "reason": str(e)}
                        stage.write_manifest(finished=False)
                    raise
                rec = {"id": f"step-{step:06d}", "step": step, **{k: round(v, 8) for k, v in metrics.items()},
                       "pairs_per_s": round(pairs_per_step / max(time.time() - t0, 1e-9), 3)}
                last = rec
                if dist.is_main():
                    if stage.is_done(rec["id"]):
                        _check_replay(stage, rec)
                    elif step % tc.log_every == 0 or step == steps:
                        stage.commit({LOG: [rec]}, [stage.ok(rec["id"])])
                    if writer is not None:
                        for k, v in metrics.items():
                            writer.add_scalar(k, v, step)
                bar.set_postfix(loss=f"{metrics['loss/total']:.4f}", acc=f"{metrics['rewards/accuracy']:.2f}")
                bar.update(1)
                if tc.save_every and step % tc.save_every == 0 and step < steps:
                    trainer.save_state(stage.dir / "train_state", step, meta)
                _after_step(step)
    finally:
        if writer is not None:
            writer.close()

    model = trainer.final_model()
    trainer.save_checkpoint(ckpt, model)
    zero3 = trainer.ds is not None and trainer.zero_stage == 3
    trainer.close()
    _hand_over(get_engine, engine, model, ckpt, zero3)
    stage.extra.update({"pairs": len(data), "total_steps": steps, "pairs_per_step": pairs_per_step,
                        "final": {k: last.get(k) for k in METRICS}, "checkpoint": rundir.rel(ckpt),
                        "engine": "deepspeed" if tc.deepspeed else "torch"})
    return stage.finish(count_in=len(data))


def _check_replay(stage, rec: dict) -> None:
    """A step redone after a resume was logged before the crash: the two must agree."""
    old = next((r for r in stage.read(LOG) if r.get("id") == rec["id"]), None)
    if old is not None and abs(old["loss/total"] - rec["loss/total"]) > 1e-5 * max(1.0, abs(old["loss/total"])):
        print(f"[train] warning: {rec['id']} replayed with loss {rec['loss/total']} (logged {old['loss/total']})",
              file=sys.stderr)


def _hand_over(get_engine, engine, model, ckpt: Path, zero3: bool) -> None:
    """The next iteration samples with the trained model: in memory, or from the checkpoint."""
    if get_engine is None:
        return
    if zero3:  # partitioned weights: reload whole from the checkpoint
        get_engine.engine = None
    else:
        engine.model = model
        engine.path = str(ckpt)
        if hasattr(get_engine, "engine"):
            get_engine.engine = engine
    if hasattr(get_engine, "source"):
        get_engine.source = str(ckpt)


def _tensorboard(stage_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(stage_dir / "tensorboard"))
