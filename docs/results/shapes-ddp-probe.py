"""Probe: on 2 CPU cores, is one process with 2 intra-op threads (the recipe today) slower than
two data-parallel processes with 1 thread each, each taking half of every batch and summing
gradients with torch.distributed (gloo)?

    python docs/results/shapes-ddp-probe.py [--steps 10] [--blocks 2] [--kind phase2|yes_no|gen]

Each mode runs in fresh processes, in alternation (blocks), on the same rows (every rank draws
the whole batch from the same seeded stream and keeps its half). A step is forward + backward
+ gradient all-reduce + clip + AdamW, as in ``ospo.shapes.pretrain``. Medians of the steps
after the first two of each block.
"""
import argparse, dataclasses, json, os, socket, statistics, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def worker(rank: int, world: int, steps: int, kind: str, threads: int) -> None:
    import torch
    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from ospo.engine import Engine
    from ospo.shapes import pretrain as pt
    from ospo.shapes import vq as vqm
    from ospo.shapes.packing import pack_rows, packed_lm_loss
    from ospo.logps import pad_prompts, visual_logps_padded

    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo", rank=rank, world_size=world)
    eng = Engine.load(path="shapes:")
    model = eng.model
    r = dataclasses.replace(pt.Recipe(), gen_pool=256, und_pool=256)
    b = pt.Batcher(eng, model.model.vqmodel, r, seed_tag="ddp-probe", progress=False)
    for p in model.model.vqmodel.parameters():
        p.requires_grad_(False)
    params, opt = pt._optimizer(model, r, 1e-5)
    pad = eng.ids.pad
    sl = slice(rank, None, world)
    times, losses = [], []
    for step in range(steps):
        model.train(); model.model.vqmodel.eval()
        t = time.perf_counter()
        loss = torch.zeros(())
        if kind in ("phase2", "yes_no"):
            rows, starts, recon = b.curriculum_yes_no(None)
            pv = vqm.to_pixels(recon)
            loss = loss + pt.lm_loss(model, rows[sl], starts[sl], pad, pv[sl]) / world
        if kind in ("phase2", "gen"):
            ids, toks = b.generation()
            input_ids, attn = pad_prompts(ids[sl], pad)
            tk = toks[sl]
            lp = visual_logps_padded(model, input_ids, attn, tk)
            wt = 1.0 + (r.gen_object_weight - 1.0) * (tk != vqm.BLANK_CODE).float()
            loss = loss - (lp * wt).sum() / wt.sum() / world
        if kind == "phase2":
            rows, starts = b.text()
            loss = loss + packed_lm_loss(model, pack_rows(rows[sl], starts[sl], r.text_pack_len), pad, None) / world
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            dist.all_reduce(flat)
            off = 0
            for p in params:
                n = p.numel()
                p.grad = flat[off:off + n].view_as(p)
                off += n
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        times.append(time.perf_counter() - t)
        total = loss.detach().clone()
        if world > 1:   # the whole batch's loss, to check both modes train on the same rows
            dist.all_reduce(total)
        losses.append(total.item())
    if rank == 0:
        print("RESULT " + json.dumps({"step_s": times, "loss0": losses[0]}), flush=True)
    if world > 1:
        dist.destroy_process_group()


def run_mode(world: int, steps: int, kind: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(2 // world))
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(k), str(world), str(steps), kind],
                              env=env, stdout=subprocess.PIPE, text=True) for k in range(world)]
    outs = [p.communicate()[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]
    line = [l for l in outs[0].splitlines() if l.startswith("RESULT ")][0]
    return json.loads(line[7:])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        rank, world, steps, kind = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        worker(rank, world, steps, kind, 2 // world)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--kind", default="phase2", choices=["phase2", "yes_no", "gen"])
    ap.add_argument("--json")
    a = ap.parse_args()
    res = {"1 process x 2 threads": [], "2 processes x 1 thread": []}
    loss0 = {}
    for blk in range(a.blocks):
        for name, world in (("1 process x 2 threads", 1), ("2 processes x 1 thread", 2)):
            out = run_mode(world, a.steps, a.kind)
            res[name] += out["step_s"][2:]
            loss0[name] = out["loss0"]
            print(blk, name, round(statistics.median(out["step_s"][2:]), 4), flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    summary = {"kind": a.kind, "steps_per_block": a.steps, "blocks": a.blocks, "median_step_s": med,
               "speedup_2x1_over_1x2": med["1 process x 2 threads"] / med["2 processes x 1 thread"],
               "first_step_loss": loss0}
    print(json.dumps(summary, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
