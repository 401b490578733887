"""Benchmark stage 4's yes/no scoring, four ways side by side in one run:

1. ``loop``     one processor call + one forward per (image, question): the plain path;
                the vision encoder and the ~600-token prefill run once per question;
2. ``per_row``  batched, left padded, pixel values with every row: still one encoder pass
                per question;
3. ``once``     batched, the vision encoder once per image (features handed to the model
                as ``mm_encoder_outputs``), full sequence per row;
4. ``prefix``   batched, encoder AND language-model prefill over the image prefix once per
                image (KV cache), each question runs only its suffix (what stage 4 runs).

All four answer the same (image, question) rows; the script checks that they agree and
reports rows (questions) per second and the speedups over the loop.

    python bench/bench_vqa.py --quick            # tiny random Janus, < 60 s on 2 CPU cores
    python bench/bench_vqa.py --model PATH_OR_ID --images 8 --questions 6 --batch-size 48

Without ``--model`` a tiny random Janus is built in a temporary directory; ``--grid``
sets its visual grid (24 = Janus-Pro's 576 image tokens, the real sequence shape).
On CPU the numbers come from a tiny model: read the ratios, not the absolute rates.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, < 60 s on a laptop CPU")
    p.add_argument("--model", help="checkpoint for from_pretrained (default: a random Janus, see --shapes)")
    p.add_argument("--shapes", choices=["tiny", "janus-pro-1b"], default="tiny",
                   help="random model without --model: the tiny test Janus, or Janus-Pro-1B's dimensions "
                        "(1.5B random parameters, built in memory; meant for a GPU)")
    p.add_argument("--grid", type=int, default=None, help="tiny model's visual grid (default 24; quick 16)")
    p.add_argument("--images", type=int, default=None, help="images (default 8; quick 4)")
    p.add_argument("--questions", type=int, default=None, help="questions per image (default 6; quick 5)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per forward (default: all rows of an image group)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, best taken (default 3; quick 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


QUESTION_BANK = [
    "Is there a red cube?", "Is there a blue ball?", "Is the cube to the left of the ball?",
    "Are there two dogs?", "Is the dog black?", "Is there a wooden bench?", "Is the cat on the sofa?",
    "Are there three green apples on the plate?", "Is the lamp above the desk?", "Is the cup made of glass?",
]


def _random_janus_pro_1b():
    """Random weights with Janus-Pro-1B's dimensions (text: LLaMA 2048 x 24 layers, 16 heads,
    vocab 102400; vision: SigLIP-L 1024 x 24 layers, 384 px, patch 16 -> 576 tokens), the
    offline tokenizer of ospo.tiny. Timings have the real shapes; the answers are noise."""
    import torch
    from transformers import (JanusConfig, JanusForConditionalGeneration, JanusImageProcessor, JanusProcessor,
                              JanusVisionConfig, JanusVQVAEConfig, LlamaConfig)

    from ospo.engine import Engine, pick_device, pick_dtype
    from ospo.tiny import CHAT_TEMPLATE, IMAGE, build_tokenizer

    tok = build_tokenizer()
    text = LlamaConfig(vocab_size=102400, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=16384,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = JanusVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=384,
                               patch_size=16, projection_dim=2048, num_image_tokens=576, mlp_ratio=4.0)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=16384, latent_channels=32, base_channels=32,
                          channel_multiplier=[1, 1], num_res_blocks=1, projection_dim=2048,
                          image_token_embed_dim=2048)
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                         image_token_id=tok.convert_tokens_to_ids(IMAGE))
    device = pick_device("auto")
    dtype = pick_dtype("auto", device)
    torch.manual_seed(0)
    with torch.device(device):
        model = JanusForConditionalGeneration(config)
    model.to(dtype).eval()
    proc = JanusProcessor(image_processor=JanusImageProcessor(size={"height": 384, "width": 384},
                                                              image_mean=[0.5] * 3, image_std=[0.5] * 3),
                          tokenizer=tok, chat_template=CHAT_TEMPLATE, num_image_tokens=576)
    return Engine(model, proc, path="random:janus-pro-1b", device=device, dtype=dtype)


def main(argv=None) -> dict:
    args = parse_args(argv)
    quick = args.quick
    grid = args.grid or (16 if quick else 24)
    n_img = args.images or (4 if quick else 8)
    n_q = args.questions or (5 if quick else 6)
    repeats = args.repeats or (2 if quick else 3)

    import numpy as np
    import torch
    from PIL import Image

    from ospo import understanding as U
    from ospo.engine import Engine
    from ospo.config import ModelConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.model:
        engine = Engine.load(ModelConfig(path=args.model))
    elif args.shapes == "janus-pro-1b":
        engine = _random_janus_pro_1b()
        grid = 24
    else:
        from ospo.tiny import build_tiny_janus

        tmp = tempfile.mkdtemp(prefix="bench-vqa-")
        levels = 3 if grid >= 12 else 4
        engine = Engine.load(path=str(build_tiny_janus(tmp, grid=grid, vq_levels=levels)))
    load_s = time.perf_counter() - t0
    side = engine.model.config.vision_config.image_size
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n_img)]
    questions = [[QUESTION_BANK[(i + j) % len(QUESTION_BANK)] for j in range(n_q)] for i in range(n_img)]
    rows = n_img * n_q
    bs = args.batch_size or rows

    def loop():
        return [[U.yes_no_probs_reference(engine, im, q) for q in qs] for im, qs in zip(images, questions)]

    def batched(mode):
        def f():
            res = U.yes_no_probs(engine, images, questions, batch_size=bs, mode=mode)
            return [list(zip(r.p_yes, r.p_no)) for r in res]
        return f

    def sync():
        if engine.device.type == "cuda":
            torch.cuda.synchronize()

    ways = {"loop": loop, "per_row": batched("per_row"), "once": batched("once"), "prefix": batched("prefix")}
    results, outputs = {}, {}
    for name, fn in ways.items():
        outputs[name] = fn()  # warm-up (and the answers for the agreement check)
    for _ in range(repeats):
        for name, fn in ways.items():  # interleaved, so load changes hit all three alike
            sync()
            t = time.perf_counter()
            fn()
            sync()
            dt = time.perf_counter() - t
            results[name] = min(results.get(name, float("inf")), dt)
    ref = np.array(outputs["loop"])
    agree = {name: float(np.abs(np.array(outputs[name]) - ref).max()) for name in ("per_row", "once", "prefix")}
    report = {
        "device": str(engine.device), "dtype": str(engine.dtype).replace("torch.", ""),
        "model": args.model or (f"random Janus-Pro-1B shapes, {side} px" if args.shapes != "tiny" else
                                f"tiny random Janus, grid {grid} ({grid * grid} image tokens), {side} px"),
        "seq_len": len(U.query_ids(engine, questions[0][0])),
        "images": n_img, "questions_per_image": n_q, "rows": rows, "batch_size": bs, "repeats": repeats,
        "threads": torch.get_num_threads(), "load_s": round(load_s, 2),
        "seconds": {k: round(v, 4) for k, v in results.items()},
        "questions_per_s": {k: round(rows / v, 1) for k, v in results.items()},
        "speedup_vs_loop": {k: round(results["loop"] / v, 2) for k, v in results.items()},
        "encode_once_vs_per_row": round(results["per_row"] / results["once"], 2),
        "prefix_once_vs_per_row": round(results["per_row"] / results["prefix"], 2),
        "max_abs_diff_vs_loop": agree,
    }
    print(f"[bench_vqa] {report['model']} on {report['device']} ({report['dtype']}, {report['threads']} threads); "
          f"{n_img} images x {n_q} questions = {rows} rows, sequence {report['seq_len']} tokens, batch {bs}")
    print(f"{'way':<10}{'seconds':>10}{'questions/s':>14}{'vs loop':>10}")
    for name in ways:
        print(f"{name:<10}{results[name]:>10.4f}{rows / results[name]:>14.1f}{results['loop'] / results[name]:>9.2f}x")
    print(f"image encoded once per image vs once per question (batched both): "
          f"{report['encode_once_vs_per_row']:.2f}x (encoder only), "
          f"{report['prefix_once_vs_per_row']:.2f}x (encoder + image prefill)")
    print("max |p - p_loop|: " + ", ".join(f"{k} {v:.2e}" for k, v in agree.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
    sys.exit(0)
