"""The tiny Janus builder and the run-directory guarantees."""

from __future__ import annotations

import json

import pytest
import torch

from ospo import config
from ospo.rundir import RunDir, StageError, derive_seed, read_jsonl


def test_tiny_loads_through_from_pretrained(tiny_model_dir, engine):
    from transformers import JanusForConditionalGeneration

    m = JanusForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert m.config.text_config.num_key_value_heads < m.config.text_config.num_attention_heads  # GQA
    assert engine.grid ** 2 == engine.num_image_tokens == engine.processor.num_image_tokens
    assert engine.model.generation_config.generation_kwargs["boi_token_id"] == engine.ids.boi
    # chat template: Janus-Pro's conversation format
    assert engine.chat("a cat") == "<|User|>: a cat\n\n<|Assistant|>:"
    ids = engine.image_prompt_ids(["a cat", "two dogs near a bench"])
    assert all(s[0] == engine.ids.bos and s[-1] == engine.ids.boi for s in ids)
    # the processor builds the same ids in image mode
    enc = engine.processor(text=[engine.chat("a cat")], generation_mode="image", return_tensors="pt")
    assert enc["input_ids"][0].tolist() == ids[0]


def test_tiny_model_generates_an_image(engine):
    enc = engine.processor(text=[engine.chat("a cat"), engine.chat("two dogs near a bench")], generation_mode="image",
                           return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = engine.model.generate(**enc, generation_mode="image", guidance_scale=2.0, do_sample=True)
    assert out.shape == (2, engine.num_image_tokens)
    pix = engine.model.decode_image_tokens(out)
    assert pix.shape[1] == pix.shape[2] == engine.model.config.vision_config.image_size


def test_text_generation_is_per_row_reproducible(engine):
    kw = dict(prefix="Prompt:", max_new_tokens=12, temperature=1.0, top_p=0.9)
    both = engine.generate_text(["hello", "write a prompt about a red cat"], seeds=[1, 2], **kw)
    alone = engine.generate_text(["write a prompt about a red cat"], seeds=[2], **kw)
    assert both[1] == alone[0] and both[0].startswith("Prompt:")
    other = engine.generate_text(["write a prompt about a red cat"], seeds=[3], **kw)
    assert other[0] != alone[0]


def test_derive_seed_depends_on_identity_only():
    assert derive_seed(0, "perturb", "a", 1) == derive_seed(0, "perturb", "a", 1)
    assert len({derive_seed(0, "perturb", "a", k) for k in range(50)}) == 50
    assert derive_seed(1, "perturb", "a", 1) != derive_seed(0, "perturb", "a", 1)


def _view(**kw):
    return config.build({}, [f"{k}={v}" for k, v in kw.items()]).stage_view("perturb")


def test_stagerun_exactly_once_after_crash(tmp_path):
    rd = RunDir(tmp_path)
    st = rd.stage(0, "perturb", _view())
    st.commit({"variants.jsonl": [{"id": "a"}]}, [st.ok("a")])
    st.commit({"variants.jsonl": [{"id": "b"}]}, [st.reject("b", "bad")])
    # crash between record and ledger, then a half line
    with open(st.outputs["variants.jsonl"], "a") as fh:
        fh.write(json.dumps({"id": "c"}) + "\n" + '{"id": "d", "x"')
    st2 = rd.stage(0, "perturb", _view())
    assert [r["id"] for r in read_jsonl(st2.outputs["variants.jsonl"])] == ["a", "b"]
    assert st2.todo(["a", "b", "c", "d"]) == ["c", "d"]
    assert st2.counts() == (1, 1, {"bad": 1})


def test_stagerun_config_change_force_and_stale(tmp_path):
    rd = RunDir(tmp_path)
    st = rd.stage(0, "perturb", _view())
    st.commit({"variants.jsonl": [{"id": "a"}]}, [st.ok("a")])
    st.finish(count_in=1)
    (tmp_path / "iter_00" / "vqa.done").write_text("")
    with pytest.raises(StageError, match="perturb.num_variants"):
        rd.stage(0, "perturb", _view(**{"perturb.num_variants": 2}))
    st = rd.stage(0, "perturb", _view(**{"perturb.num_variants": 2}), force=True)
    assert st.done == {} and not st.outputs["variants.jsonl"].exists()
    assert (tmp_path / "iter_00" / "vqa.stale").exists()
    assert not (tmp_path / "iter_00" / "images.stale").exists()  # never ran: nothing to mark
    # the stale stage starts over on its next run
    (tmp_path / "iter_00" / "vqa.jsonl").write_text('{"id": "a"}\n')
    v = rd.stage(0, "vqa", config.build({}).stage_view("vqa"))
    assert not (tmp_path / "iter_00" / "vqa.jsonl").exists() and not (tmp_path / "iter_00" / "vqa.stale").exists()
    assert v.done == {}


def test_default_iteration(tmp_path):
    rd = RunDir(tmp_path)
    assert rd.default_iteration() == 0
    (tmp_path / "iter_00").mkdir()
    assert rd.default_iteration() == 0
    (tmp_path / "iter_00" / "train.manifest.json").write_text(json.dumps({"finished": True}))
    assert rd.default_iteration() == 1
