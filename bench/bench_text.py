"""Benchmark stages 1-2's text generation: ``Engine.generate_text`` batched vs one prompt at a
time (a loop of single-row calls), on the tiny random Janus (issue 7, item 3).

Both ways generate the same rows (same seeds, the same fixed ``max_new_tokens``: random
weights never stop on their own) and report generated tokens/s (on CPU from process CPU
time with one torch thread, robust to other jobs on a shared machine; wall time on a GPU).

    python bench/bench_text.py --quick     # 8 prompts x 16 tokens
    python bench/bench_text.py             # 32 prompts x 48 tokens

On CPU the model is tiny: read the ratio, not the rates.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ["Write a prompt about two objects and their colors.", "Describe a scene.",
           "Write a short image prompt with a spatial relation between a dog and a bench.",
           "A counting prompt, please.", "Give me a prompt with three objects of different shapes on a table.",
           "Texture prompt.", "Describe a kitchen with a red kettle next to a white mug in the morning light.",
           "One object."]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8 prompts x 16 new tokens")
    p.add_argument("--prompts", type=int, default=None, help="rows (default 32; quick 8)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per row (default 48; quick 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, best taken (default 3; quick 1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", help="checkpoint (default: a tiny random Janus)")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from ospo.engine import Engine
    from ospo.tiny import build_tiny_janus

    torch.set_num_threads(args.threads)
    n = args.prompts or (8 if args.quick else 32)
    new = args.new_tokens or (16 if args.quick else 48)
    repeats = args.repeats or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="bench-text-") as tmp:
        eng = Engine.load(path=args.model or str(build_tiny_janus(Path(tmp) / "tiny")))
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    seeds = list(range(n))
    # random weights may sample EOS early: count the tokens each way actually produced

    def batched():
        return eng.generate_text(texts, seeds=seeds, prefix="Prompt:", max_new_tokens=new, batch_size=n)

    def one_by_one():
        return [eng.generate_text([t], seeds=[s], prefix="Prompt:", max_new_tokens=new, batch_size=1)[0]
                for t, s in zip(texts, seeds)]

    cuda = eng.device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ways = {"batched": batched, "one_by_one": one_by_one}
    outs = {k: f() for k, f in ways.items()}  # warm-up, and the outputs for the token count
    best = {k: float("inf") for k in ways}
    for _ in range(repeats):
        for k, f in ways.items():
            sync()
            t0 = clock()
            f()
            sync()
            best[k] = min(best[k], clock() - t0)
    toks = {k: sum(len(eng.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in v) for k, v in outs.items()}
    report = {"device": str(eng.device), "dtype": str(eng.dtype).replace("torch.", ""), "prompts": n,
              "max_new_tokens": new, "repeats": repeats, "threads": torch.get_num_threads(),
              "clock": "wall" if cuda else "process_cpu",
              "seconds": {k: round(v, 4) for k, v in best.items()},
              "tokens": toks,
              "tokens_per_s": {k: round(toks[k] / best[k], 1) for k in ways},
              "same_outputs": outs["batched"] == outs["one_by_one"]}
    report["speedup_batched"] = round(report["tokens_per_s"]["batched"] / report["tokens_per_s"]["one_by_one"], 2)
    print(f"[bench_text] {n} prompts x <= {new} new tokens on {report['device']} ({report['threads']} threads)")
    for k in ways:
        print(f"  {k:<11} {best[k]:8.3f} s  {report['tokens_per_s'][k]:8.1f} tok/s")
    print(f"  batched vs one-by-one: {report['speedup_batched']:.2f}x  (same outputs: {report['same_outputs']})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
