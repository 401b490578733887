"""Does a checkpoint read its prompt? Teacher-forced image likelihood under edited prompts.

    python -m ospo.shapes.diagnose [--checkpoint shapes:] [--n 64] [--seed 1]

For the first ``n`` held-out scenes, render the scene, VQ-code it with the checkpoint's own
VQ, and score those visual tokens (mean log-probability per token, the quantity stage 5
trains) under: the right prompt; another scene's prompt; the prompt with every colour
rotated (red -> green -> blue -> yellow -> red); the prompt with every shape rotated; and the
unconditional prompt (the pads classifier-free guidance uses). A model that reads its prompt
scores the right prompt highest. Used by the README's diagnosis of the ShapesWorld
measurement: the shipped model reads its prompt teacher-forced, yet its samples ignore
colour and shape.
"""

from __future__ import annotations

import argparse
import json
import random
import re

import torch

from ospo.shapes.world import COLORS, SHAPES


def rotate_colors(prompt: str) -> str:
    """Every colour word -> the world's next colour (red -> green -> blue -> yellow -> red)."""
    return re.sub(rf"\b({'|'.join(COLORS)})\b",
                  lambda m: COLORS[(COLORS.index(m.group(1)) + 1) % len(COLORS)], prompt)


def rotate_shapes(prompt: str) -> str:
    """Every shape word (singular or plural) -> the world's next shape."""
    return re.sub(rf"\b({'|'.join(SHAPES)})(s?)\b",
                  lambda m: SHAPES[(SHAPES.index(m.group(1)) + 1) % len(SHAPES)] + m.group(2), prompt)


@torch.no_grad()
def prompt_sensitivity(engine, n: int = 64, seed: int = 1) -> dict:
    from ospo.logps import pad_prompts, visual_logps_padded
    from ospo.sampling import _uncond
    from ospo.shapes import grammar as gr
    from ospo.shapes import vq as vqm
    from ospo.shapes import world as w

    rng = random.Random(seed)
    recs = gr.heldout_records()[:n]
    imgs = w.render_batch([w.sample_layout(gr.Scene.from_dict(r["scene"]), rng) for r in recs])
    model = engine.model
    toks = model.model.vqmodel.encode(vqm.to_pixels(imgs).to(engine.device, engine.dtype),
                                      return_dict=True).image_tokens.view(len(imgs), -1)
    prompts = [r["prompt"] for r in recs]

    def per_row(ps: list[str], uncond: bool = False) -> torch.Tensor:
        a, m = pad_prompts(engine.image_prompt_ids(ps), engine.ids.pad)
        if uncond:                                  # the rows stage 3 guides with
            a = _uncond(engine, a)
        return visual_logps_padded(model, a.to(engine.device), m.to(engine.device), toks).float().mean(-1).cpu()

    right = per_row(prompts)
    out = {"n": len(prompts), "right": round(right.mean().item(), 4)}
    edits = {"other_scene": prompts[1:] + prompts[:1], "colors_rotated": [rotate_colors(p) for p in prompts],
             "shapes_rotated": [rotate_shapes(p) for p in prompts]}
    for name, alt in edits.items():
        changed = torch.tensor([a != p for a, p in zip(alt, prompts)])
        x = per_row(alt)
        out[name] = {"n": int(changed.sum()), "right": round(right[changed].mean().item(), 4),
                     "edited": round(x[changed].mean().item(), 4),
                     "right_higher": round((right[changed] > x[changed]).float().mean().item(), 4)}
    out["unconditional"] = round(per_row(prompts, uncond=True).mean().item(), 4)
    return out


def main(argv: list[str] | None = None) -> dict:
    from ospo.engine import Engine

    ap = argparse.ArgumentParser(prog="python -m ospo.shapes.diagnose", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="shapes:")
    ap.add_argument("--n", type=int, default=64, help="held-out scenes to score")
    ap.add_argument("--seed", type=int, default=1, help="layout seed of the rendered scenes")
    a = ap.parse_args(argv)
    res = prompt_sensitivity(Engine.load(path=a.checkpoint), a.n, a.seed)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
