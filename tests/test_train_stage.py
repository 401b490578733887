"""Stage 5 on the tiny random Janus: a hand-made pairs.jsonl (random tokens within the
codebook, random masks, prompts) in a temporary run directory. Parameters move and the
loss falls on a fixed batch; frozen parts stay put; DeepSpeed ZeRO-2 runs single-process on
CPU; the checkpoint loads back through from_pretrained; a killed run resumes to the same
losses; empty input and NaN stop with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ospo import config
from ospo.engine import Engine
from ospo.logps import visual_logps
from ospo.rundir import RunDir, StageError, read_jsonl
from ospo.stages import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
GRID = 8
PROMPTS = ["a red cube and a blue ball", "a dog to the left of a bench", "three green apples",
           "a wooden chair and a metal bucket"]


class Lazy:
    """What run.py hands a stage: loads on first call; the trainer may swap the model in."""

    def __init__(self, path):
        self.source, self.engine = path, None

    def __call__(self):
        if self.engine is None:
            self.engine = Engine.load(path=self.source)
        return self.engine


def write_pairs(wd: Path, n=4, seed=0, nan_ids=()) -> list[dict]:
    rng = np.random.RandomState(seed)
    recs = []
    for i in range(n):
        pid = f"p{i}"
        side = lambda: {"tokens": rng.randint(0, 256, GRID * GRID).tolist(),  # noqa: E731
                        "mask": rng.randint(0, 2, (GRID, GRID)).tolist(), "image": None}
        rec = {"id": pid, "category": "attribute", "sub_category": "color", "prompt": PROMPTS[i % len(PROMPTS)],
               "k": 0, "S_chosen": 0.5, "S_rejected": -0.5, "questions": ["Is there a cube?"],
               "chosen": side(), "rejected": side()}
        if pid in nan_ids:
            rec["chosen"]["mask"] = [[float("nan")] * GRID] * GRID
        recs.append(rec)
    (wd / "iter_00").mkdir(parents=True, exist_ok=True)
    (wd / "iter_00" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def cfg_for(model_dir, *overrides):
    return config.load(TINY, [f"model.path={model_dir}", *overrides])


def run_train(wd, model_dir, *overrides, force=False):
    lazy = Lazy(model_dir)
    cfg = cfg_for(model_dir, *overrides)
    m = train.run(cfg, RunDir(wd), 0, lazy, force=force)
    return m, lazy


def losses(wd):
    return [r["loss/total"] for r in read_jsonl(wd / "iter_00" / "train_log.jsonl")]


def test_steps_move_params_lower_loss_and_keep_frozen_parts(tmp_path, tiny_model_dir):
    recs = write_pairs(tmp_path, n=2)
    before = Engine.load(path=tiny_model_dir).model.state_dict()
    # one fixed batch (2 pairs, micro batch 2): every step sees the same data
    m, lazy = run_train(tmp_path, tiny_model_dir, "train.max_steps=6", "train.warmup_ratio=0.0",
                        "train.learning_rate=1e-3", "train.min_learning_rate=1e-3")
    assert m["finished"] and m["counts"]["out"] == 6
    log = read_jsonl(tmp_path / "iter_00" / "train_log.jsonl")
    assert [r["id"] for r in log] == [f"step-{i:06d}" for i in range(1, 7)]
    for k in ("loss/total", "loss/simpo", "loss/sft", "rewards/chosen", "rewards/rejected", "rewards/margins",
              "rewards/accuracy", "logps/chosen", "logps/rejected", "lr", "grad_norm"):
        assert all(np.isfinite(r[k]) for r in log), k
    assert log[-1]["loss/total"] < log[0]["loss/total"] - 0.05
    assert log[-1]["rewards/margins"] > log[0]["rewards/margins"]
    after = lazy.engine.model.state_dict()
    moved = lambda prefix: any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))  # noqa: E731
    same = lambda prefix: all(torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))  # noqa: E731
    assert moved("model.language_model.") and moved("model.generation_head.") and moved("model.generation_embeddings.")
    assert same("model.vision_model.") and same("model.vqmodel.") and same("model.aligner.")
    assert not lazy.engine.model.training  # back to eval for the next iteration's sampling
    assert lazy.source == str(tmp_path / "iter_00" / "checkpoint")

    # The checkpoint loads back through from_pretrained and gives the in-memory log-probs.
    ck = Engine.load(path=lazy.source)
    ids = ck.image_prompt_ids([recs[0]["prompt"]])
    toks = torch.tensor([recs[0]["chosen"]["tokens"]])
    with torch.no_grad():
        torch.testing.assert_close(visual_logps(ck, ids, toks), visual_logps(lazy.engine, ids, toks),
                                   atol=1e-6, rtol=0)
    gen = json.loads((tmp_path / "iter_00" / "checkpoint" / "generation_config.json").read_text())
    assert gen["generation_kwargs"]["boi_token_id"] == ck.ids.boi

    # A rerun of a finished stage trains nothing more.
    m2, lazy2 = run_train(tmp_path, tiny_model_dir, "train.max_steps=6", "train.warmup_ratio=0.0",
                          "train.learning_rate=1e-3", "train.min_learning_rate=1e-3")
    assert lazy2.engine is None and len(losses(tmp_path)) == 6


def test_resume_reproduces_uninterrupted_losses(tmp_path, tiny_model_dir, monkeypatch):
    overrides = ("train.max_steps=5", "train.save_every=2", "train.grad_accum=2", "train.micro_batch_size=1",
                 "train.warmup_ratio=0.2", "train.learning_rate=5e-4")
    a, b = tmp_path / "a", tmp_path / "b"
    write_pairs(a, n=3)
    write_pairs(b, n=3)
    run_train(a, tiny_model_dir, *overrides)

    class Killed(Exception):
        pass

    def crash(step):
        if step == 3:  # state saved at step 2; step 3 logged, then the process dies
            raise Killed

    monkeypatch.setattr(train, "_after_step", crash)
    with pytest.raises(Killed):
        run_train(b, tiny_model_dir, *overrides)
    assert json.loads((b / "iter_00" / "train_state" / "meta.json").read_text())["step"] == 2
    assert not (b / "iter_00" / "checkpoint").exists()
    monkeypatch.setattr(train, "_after_step", lambda step: None)
    run_train(b, tiny_model_dir, *overrides)
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 5
    np.testing.assert_allclose(lb, la, atol=1e-6, rtol=0)
    lrs = [r["lr"] for r in read_jsonl(b / "iter_00" / "train_log.jsonl")]
    assert lrs == [r["lr"] for r in read_jsonl(a / "iter_00" / "train_log.jsonl")]


def test_empty_pairs_is_a_clear_error(tmp_path, tiny_model_dir):
    (tmp_path / "iter_00").mkdir(parents=True)
    (tmp_path / "iter_00" / "pairs.jsonl").write_text("")
    lazy = Lazy(tiny_model_dir)
    with pytest.raises(StageError, match="no pairs"):
        train.run(cfg_for(tiny_model_dir), RunDir(tmp_path), 0, lazy)
    assert lazy.engine is None  # failed before loading anything
    assert not (tmp_path / "iter_00" / "checkpoint").exists()


def test_nan_stops_with_ids_and_keeps_last_good_state(tmp_path, tiny_model_dir):
    write_pairs(tmp_path, n=4, nan_ids=("p2",))
    with pytest.raises(StageError, match=r"non-finite loss at step \d+ for pair\(s\) p2/k0") as e:
        run_train(tmp_path, tiny_model_dir, "train.max_steps=4", "train.save_every=1")
    bad_step = int(str(e.value).split("at step ")[1].split()[0])
    sd = tmp_path / "iter_00" / "train_state"
    if bad_step > 1:
        assert json.loads((sd / "meta.json").read_text())["step"] == bad_step - 1
    else:
        assert not sd.exists()
    assert not (tmp_path / "iter_00" / "checkpoint").exists()
    assert len(losses(tmp_path)) == bad_step - 1
    m = json.loads((tmp_path / "iter_00" / "train.manifest.json").read_text())
    assert not m["finished"] and "p2/k0" in m["extra"]["stopped"]["reason"]


def test_bad_tokens_named(tmp_path, tiny_model_dir):
    recs = write_pairs(tmp_path, n=2)
    recs[1]["rejected"]["tokens"] = recs[1]["rejected"]["tokens"][:10]
    (tmp_path / "iter_00" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(StageError, match="p1/k0"):
        run_train(tmp_path, tiny_model_dir)


def test_simpo_alpha_zero_and_sft_only_switches(tmp_path, tiny_model_dir):
    write_pairs(tmp_path / "s", n=2)
    write_pairs(tmp_path / "f", n=2)
    run_train(tmp_path / "s", tiny_model_dir, "train.loss=simpo", "train.max_steps=1", "train.sft_weight=0")
    run_train(tmp_path / "f", tiny_model_dir, "train.loss=sft", "train.max_steps=1")
    s = read_jsonl(tmp_path / "s" / "iter_00" / "train_log.jsonl")[0]
    f = read_jsonl(tmp_path / "f" / "iter_00" / "train_log.jsonl")[0]
    assert s["loss/total"] == pytest.approx(s["loss/simpo"], abs=1e-6)
    # alpha = 0: rewards are beta * mean logp
    assert s["rewards/chosen"] == pytest.approx(0.5 * s["logps/chosen"], abs=1e-5)
    assert f["loss/total"] == pytest.approx(f["loss/sft"], abs=1e-6)
    assert f["loss/sft"] == pytest.approx(-f["logps/chosen"], abs=1e-5)


def test_unconditional_sft_term_adds_the_chosen_images_nll_under_the_guidance_row(tmp_path, tiny_model_dir):
    """train.sft_uncond_weight > 0 adds the chosen tokens' NLL under the unconditional prompt
    (the row CFG samples from: sampling's rule); 0, the paper's loss, leaves it out."""
    from ospo import sampling
    from ospo.logps import pad_prompts, visual_logps_padded

    recs = write_pairs(tmp_path / "u", n=2)
    write_pairs(tmp_path / "p", n=2)
    common = ("train.max_steps=1", "train.micro_batch_size=2", "train.grad_accum=1", "train.gradient_checkpointing=false")
    run_train(tmp_path / "u", tiny_model_dir, *common, "train.sft_uncond_weight=1.5")
    run_train(tmp_path / "p", tiny_model_dir, *common)
    u = read_jsonl(tmp_path / "u" / "iter_00" / "train_log.jsonl")[0]
    p = read_jsonl(tmp_path / "p" / "iter_00" / "train_log.jsonl")[0]
    assert p["loss/sft_uncond"] == 0.0
    assert p["loss/total"] == pytest.approx(p["loss/simpo"] + 2.0 * p["loss/sft"], abs=1e-5)
    assert u["loss/total"] == pytest.approx(u["loss/simpo"] + 2.0 * u["loss/sft"] + 1.5 * u["loss/sft_uncond"], abs=1e-5)
    # the term's value, computed independently from the base model (step 1 runs before any update)
    eng = Engine.load(path=tiny_model_dir)
    ids, mask = pad_prompts(eng.image_prompt_ids([r["prompt"] for r in recs]), eng.ids.pad)
    un = sampling._uncond(eng, ids)
    assert train.unconditional_prompt(eng.image_prompt_ids([recs[0]["prompt"]])[0], eng.ids.pad) == \
        un[0][mask[0].bool()].tolist()
    toks = torch.tensor([r["chosen"]["tokens"] for r in recs])
    with torch.no_grad():
        lp = visual_logps_padded(eng.model, un, mask, toks)
    assert u["loss/sft_uncond"] == pytest.approx(-lp.mean().item(), abs=1e-4)
    assert abs(u["loss/sft_uncond"] - u["loss/sft"]) > 1e-3   # not the conditional rows' NLL


def test_deepspeed_zero2_single_process_cpu(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("deepspeed")
    import torch.distributed as td

    if not td.is_initialized():  # a 1-rank group for this test; the variables are restored after it
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                     ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            monkeypatch.setenv(k, v)
    write_pairs(tmp_path / "ds", n=2)
    write_pairs(tmp_path / "pt", n=2)
    common = ("train.max_steps=3", "train.learning_rate=1e-3", "train.warmup_ratio=0.0")
    m, lazy = run_train(tmp_path / "ds", tiny_model_dir, *common, "train.deepspeed=configs/deepspeed/zero2.json")
    run_train(tmp_path / "pt", tiny_model_dir, *common)
    assert m["extra"]["engine"] == "deepspeed"
    ds_l, pt_l = losses(tmp_path / "ds"), losses(tmp_path / "pt")
    assert len(ds_l) == 3
    np.testing.assert_allclose(ds_l, pt_l, atol=1e-4, rtol=0)  # ZeRO-2 = plain torch (fp32 on CPU)
    assert (tmp_path / "ds" / "iter_00" / "checkpoint" / "config.json").exists()
    assert not lazy.engine.model.training


def test_lora_merged_checkpoint_loads_as_plain_janus(tmp_path, tiny_model_dir):
    pytest.importorskip("peft")
    write_pairs(tmp_path, n=2)
    m, lazy = run_train(tmp_path, tiny_model_dir, "train.lora=true", "train.lora_r=4", "train.lora_alpha=8",
                        "train.max_steps=2", "train.learning_rate=1e-2")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "iter_00" / "checkpoint" / "model.safetensors")).keys()
    assert not any("lora" in k for k in keys)
    base = Engine.load(path=tiny_model_dir).model.state_dict()
    after = Engine.load(path=lazy.source).model.state_dict()
    k = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[k], after[k])  # the adapters were merged into the weights
    assert torch.equal(base["model.generation_head.vision_head.weight"], after["model.generation_head.vision_head.weight"])
