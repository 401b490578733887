"""Run every benchmark in one command (issue 7) and collect the results.

    python bench/run_all.py [--quick | --tiny] [--out bench/results] [--only sampling,vqa,...]

Runs, in this order: ``sampling`` (stage 3, bench_sampling.py), ``vqa`` (stage 4,
bench_vqa.py), ``text`` (stages 1-2, bench_text.py), ``train`` (stage 5, bench_train.py)
and ``scaling`` (a whole tiny iteration at growing prompt counts, bench_scaling.py). Writes
``<out>/<date>-<host>.json`` (every bench's result dict, machine details, and the markdown
table) and ``<out>/<date>-<host>.png`` (the key ratios and the scaling fit), and prints a
markdown table for the README's "Performance" section.

``--quick`` uses each bench's own ``--quick`` sizes (minutes on 2 CPU cores); ``--tiny`` the
smallest sizes that still exercise every path (what tests/test_bench.py runs; numbers
meaningless). On a CUDA device the benches run in bf16 (the engine's ``auto`` dtype); on CPU
they use a tiny random model and the numbers are ratios, not GPU throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

SECTIONS = ("sampling", "vqa", "text", "train", "scaling")
CPU_NOTE = ("CPU run on a tiny random Janus: these numbers are ratios taken in one run (ours vs the stock "
            "path, batched vs one at a time), not GPU throughput.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="each bench's --quick sizes")
    g.add_argument("--tiny", action="store_true", help="smallest sizes (the test's smoke run)")
    p.add_argument("--out", default=str(BENCH / "results"), help="directory for <date>-<host>.json/.png")
    p.add_argument("--only", help=f"comma subset of {','.join(SECTIONS)}")
    p.add_argument("--bandwidth-model", help="checkpoint for the CUDA bandwidth-bound section (default: tiny random)")
    return p.parse_args(argv)


def bench_argv(name: str, mode: str, json_path: str) -> list[str]:
    """Command-line arguments of each bench for mode full / quick / tiny."""
    tiny = {
        "sampling": ["--grids", "8", "--batches", "1,2", "--repeats", "1"],
        "vqa": ["--grid", "8", "--images", "2", "--questions", "2", "--repeats", "1"],
        "text": ["--prompts", "2", "--new-tokens", "4", "--repeats", "1"],
        "train": ["--grid", "8", "--pairs", "2", "--micro-batch", "2", "--steps", "1", "--configs", "concat,two_fwd"],
        "scaling": ["--sizes", "1,2", "--no-warmup"],
    }
    args = ["--quick"] if mode == "quick" else tiny[name] if mode == "tiny" else []
    return args + ["--json", json_path]


def run_bench(name: str, mode: str, tmp: Path) -> dict:
    import importlib

    mod = importlib.import_module(f"bench_{name}")
    jp = tmp / f"{name}.json"
    t0 = time.perf_counter()
    print(f"\n=== {name} ({mode}) ===", flush=True)
    mod.main(bench_argv(name, mode, str(jp)))
    res = json.loads(jp.read_text())
    res["bench_wall_s"] = round(time.perf_counter() - t0, 2)
    return res


def cuda_bandwidth_section(mode: str = "full", model: str | None = None) -> dict:
    """Issue 7 item 6: stage 3 decode's achieved fraction of the memory-bandwidth bound
    (bench/bandwidth.py). CUDA only; ``model`` a checkpoint path (default a tiny random Janus,
    grid 8 at --tiny sizes, else 24: launch-bound, so its fraction is only a smoke number)."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "CUDA only: the memory-bandwidth-bound fraction of stage 3's decode needs a GPU"}
    import bandwidth

    batches = [1] if mode == "tiny" else [1, 8]
    target = model or (8 if mode == "tiny" else 24)
    repeats = 1 if mode == "tiny" else 3
    try:
        dev_bw = bandwidth.measure_bandwidth("cuda", nbytes=(1 << 26) if mode == "tiny" else (1 << 30))
        rows = [bandwidth.run(target, b, repeats=repeats, device_bandwidth=dev_bw) for b in batches]
    except Exception as e:  # noqa: BLE001 - the other sections' results must still be written
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}
    for r in rows:
        print(f"[cuda_bandwidth] {r['model']} batch {r['batch']}: {r['achieved_gb_s']:.1f} GB/s of "
              f"{r['device_bandwidth_gb_s']:.0f} GB/s = {r['fraction']:.3f} of the bound, "
              f"{r['ms_per_step']:.2f} ms/step")
    return {"device_bandwidth_gb_s": dev_bw / 1e9, "rows": rows}


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def markdown(results: dict, machine: dict) -> str:
    L = [f"Machine: {machine['host']} ({machine['device']}, {machine['cpu_count']} CPUs, torch {machine['torch']}, "
         f"{machine['mode']} sizes, {machine['date']}).", ""]
    if machine["device"] == "cpu":
        L += [f"> {CPU_NOTE}", ""]
    L += ["| stage | measure | value |", "|---|---|---|"]
    s = results.get("sampling", {})
    for r in s.get("rows", []):
        inrun = r.get("capture_inrun")
        L.append(f"| 3 images | grid {r['grid']}, batch {r['batch']}: capture overhead (end to end; in-run) / ours vs "
                 f"stock two-pass (same batch) / ours vs the public code's batch-1 path | "
                 f"{100 * r['capture_overhead']:.1f}%; {_f(None if inrun is None else 100 * inrun, '{:.1f}')}% / "
                 f"{_f(r['speedup_vs_stock'])}x / {_f(r.get('vs_public_batch1'), '{:.1f}')}x |")
    v = results.get("vqa", {})
    if "speedup_vs_loop" in v:
        sp = v["speedup_vs_loop"]
        L.append(f"| 4 vqa | questions/s vs one forward per question: per_row / encode once / prefix once | "
                 f"{sp['per_row']:.2f}x / {sp['once']:.2f}x / {sp['prefix']:.2f}x |")
        L.append(f"| 4 vqa | image encoded once per image vs once per question (batched) | "
                 f"{v['encode_once_vs_per_row']:.2f}x (prefix {v['prefix_once_vs_per_row']:.2f}x) |")
    t = results.get("text", {})
    if "speedup_batched" in t:
        L.append(f"| 1-2 text | tokens/s batched vs one prompt at a time ({t['tokens_per_s']['batched']:.0f} vs "
                 f"{t['tokens_per_s']['one_by_one']:.0f}) | {t['speedup_batched']:.2f}x |")
    tr = results.get("train", {})
    ok = [r for r in tr.get("results", []) if "error" not in r]
    ref = next((r for r in ok if r["name"] == "concat"), None)
    for r in ok:
        rel = f"{r['pairs_per_s'] / ref['pairs_per_s']:.2f}x of concat" if ref else "-"
        L.append(f"| 5 train | {r['name']}: pairs/s, peak MiB ({r['mem_kind']}) | "
                 f"{r['pairs_per_s']:.2f} ({rel}), {r['peak_mem_mib']:.0f} |")
    for r in tr.get("results", []):
        if "error" in r:
            L.append(f"| 5 train | {r['name']} | failed |")
    sc = results.get("scaling", {})
    if sc.get("fit"):
        f = sc["fit"]
        L.append(f"| scaling | whole iteration at N = {', '.join(str(n) for n in sc['sizes'])} prompts: "
                 f"slope / R^2 / quadratic vs linear at N max | {f['slope_s_per_prompt']:.3f} s/prompt / "
                 f"{f['r2']:.3f} / {_f(f.get('quad_rel'))} |")
    bw = results.get("cuda_bandwidth", {})
    if "skipped" in bw:
        L.append(f"| 3 images | fraction of the memory-bandwidth bound | skipped ({bw['skipped'].split(':')[0]}) |")
    for r in bw.get("rows", []):
        L.append(f"| 3 images | {r['model']}, batch {r['batch']}: fraction of the memory-bandwidth bound "
                 f"({r['achieved_gb_s']:.0f} of {r['device_bandwidth_gb_s']:.0f} GB/s) | {r['fraction']:.3f} |")
    if "error" in bw:
        L.append(f"| 3 images | fraction of the memory-bandwidth bound | error ({bw['error'][:80]}) |")
    for name in SECTIONS:
        if "error" in results.get(name, {}):
            L.append(f"| {name} | error | {results[name]['error'].splitlines()[-1][:80]} |")
    return "\n".join(L)


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(18, 4.2))
    s = results.get("sampling", {}).get("rows", [])
    if s:
        labels = [f"g{r['grid']} b{r['batch']}" for r in s]
        x = range(len(s))
        ax[0].bar([i - 0.2 for i in x], [r["speedup_vs_stock"] or 0 for r in s], 0.4, label="ours vs stock")
        ax[0].bar([i + 0.2 for i in x], [1 + r["capture_overhead"] for r in s], 0.4, label="cap / nocap time")
        ax[0].set_xticks(list(x), labels)
        ax[0].axhline(1.5, ls="--", c="gray", lw=0.8)
        ax[0].legend(fontsize=8)
    ax[0].set_title("stage 3 images (ratio)")
    bars = {}
    v = results.get("vqa", {})
    for k, val in v.get("speedup_vs_loop", {}).items():
        if k != "loop":
            bars[f"vqa {k}"] = val
    t = results.get("text", {})
    if "speedup_batched" in t:
        bars["text batched"] = t["speedup_batched"]
    if bars:
        ax[1].bar(list(bars), list(bars.values()), color="tab:green")
        ax[1].axhline(3, ls="--", c="gray", lw=0.8)
        ax[1].tick_params(axis="x", labelrotation=20)
    ax[1].set_title("stages 1-2, 4: batched vs one at a time (x)")
    tr = [r for r in results.get("train", {}).get("results", []) if "error" not in r]
    if tr:
        ax[2].bar([r["name"] for r in tr], [r["pairs_per_s"] for r in tr], color="tab:orange")
    ax[2].set_title("stage 5: pairs/s")
    sc = results.get("scaling", {})
    pts = [r for r in sc.get("rows", []) if r.get("rc") == 0]
    if pts:
        xs, ys = [r["prompts"] for r in pts], [r["seconds"] for r in pts]
        ax[3].plot(xs, ys, "o", label="measured")
        if sc.get("fit"):
            f = sc["fit"]
            ax[3].plot(xs, [f["slope_s_per_prompt"] * x + f["intercept_s"] for x in xs], "-",
                       label=f"{f['slope_s_per_prompt']:.2f} s/prompt, R^2 {f['r2']:.2f}")
        ax[3].set_xlabel("prompts")
        ax[3].set_ylabel("seconds")
        ax[3].legend(fontsize=8)
    ax[3].set_title("scaling: one tiny iteration")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    names = args.only.split(",") if args.only else list(SECTIONS)
    cuda = torch.cuda.is_available()
    machine = {"host": socket.gethostname(), "device": torch.cuda.get_device_name(0) if cuda else "cpu",
               "dtype": "bfloat16" if cuda else "float32", "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version(), "platform": platform.platform(), "mode": mode,
               "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if not cuda:
        print(CPU_NOTE)
    results: dict = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-all-") as tmp:
        for name in names:
            try:
                results[name] = run_bench(name, mode, Path(tmp))
            except BaseException as e:  # noqa: BLE001 - one failing bench must not lose the others
                if isinstance(e, KeyboardInterrupt):
                    raise
                traceback.print_exc()
                results[name] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"}
    results["cuda_bandwidth"] = cuda_bandwidth_section(mode, args.bandwidth_model)
    if "skipped" in results["cuda_bandwidth"]:
        print(f"[cuda_bandwidth] skipped: {results['cuda_bandwidth']['skipped']}")
    table = markdown(results, machine)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y-%m-%d')}-{machine['host']}"
    png = out / f"{stem}.png"
    plot(results, png, f"{machine['host']} ({machine['device']}), {mode} sizes, {machine['date']}"
         + ("" if cuda else " - CPU: ratios, not GPU throughput"))
    doc = {"machine": machine, "note": None if cuda else CPU_NOTE, "total_wall_s": round(time.perf_counter() - t0, 1),
           "results": results, "markdown": table, "plot": png.name}
    js = out / f"{stem}.json"
    js.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print("\n" + table + "\n")
    print(f"wrote {js}\nwrote {png}")
    return 1 if any("error" in results.get(n, {}) for n in names) else 0


if __name__ == "__main__":
    raise SystemExit(main())
