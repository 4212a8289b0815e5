"""A K=4 hyperparameter sweep in one run (`sweep:`) against the same 4 configurations trained one after another.

Both sides run lorakit's real workflow (run YAML -> load_run_config -> run_recipe), each run in a fresh process
with harness.py's allocator settings: model loading, data preparation, training, the final evaluation and saving
all count, since that is what a person waits for. The sweep side also ranks the members (sweep.json, best_adapter).
Model and data are train_throughput.py's (a Llama-shaped model from a config, seeded weights, synthetic chat
records); the grid is lr x r, 2 x 2, LoRA on q,k,v,o. Quality is not a separate measurement: every member's
adapter must equal its configuration trained alone (tests/train/test_sweep.py), and the `max |diff|` column
checks it here on the real shape. "run s" is load to save inside the process; "process s" the whole process,
Python and library imports included (what a person waits for).

    python bench/sweep.py                  # preset small (33.5M), 20 steps, batch 4 x <= 256 tokens, 2 repeats
    python bench/sweep.py --quick          # tiny shape, 4 steps: a smoke test
"""
import argparse, json, os, resource, sys, tempfile, time

import harness
from train_throughput import PRESETS, build_setup, synthetic_records

LRS = (1.0e-4, 3.0e-4)
RANKS = (8, 16)


def run_yaml(path: str, model_dir: str, train: str, validation: str, out: str, steps: int, sweep: dict | None,
             r: int = 8, lr: float = 1.0e-4) -> str:
    lines = [f"model: {{name_or_path: {model_dir}, dtype: auto}}",
             f"lora: {{r: {r}, lora_alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj]}}",
             f"data: {{train: {train}, validation: {validation}, max_seq_len: 256}}",
             f"train: {{max_steps: {steps}, batch_size: 4, lr: {lr}, seed: 0, save_every: null, memory_check: false}}",
             f"output_dir: {out}"]
    if sweep:
        lines.append("sweep: " + json.dumps(sweep))
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def worker(config: str) -> None:
    from lorakit.config import load_run_config
    from lorakit.recipes import run_recipe

    clock = harness.CpuClock().start()
    run_recipe(load_run_config(config), log=lambda line: None)
    result = clock.stop()
    result["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def timed_worker(config: str, label: str) -> dict:
    """The worker's result plus `process`: the wall time of the whole process (Python and library imports too)."""
    start = time.perf_counter()
    result = harness.run_worker([sys.executable, __file__, "--worker", config], label)
    return {**result, "process": time.perf_counter() - start}


def adapters_differ(sweep_out: str, alone_outs: dict[str, str]) -> float:
    from safetensors.torch import load_file

    worst = 0.0
    for name, out in alone_outs.items():
        a = load_file(os.path.join(sweep_out, "adapter", name, "adapter_model.safetensors"))
        b = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
        worst = max(worst, max(float((a[k].float() - b[k].float()).abs().max()) for k in b))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)

    shape = PRESETS["quick" if args.quick else "small"]
    steps = args.steps or (4 if args.quick else 20)
    print(harness.environment_line())
    print(harness.malloc_line())
    tmp = tempfile.mkdtemp(prefix="lorakit-bench-sweep-")
    model_dir, train, _, params = build_setup(tmp, shape, 60 if args.quick else 300)
    validation = os.path.join(tmp, "val.jsonl")
    with open(validation, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in synthetic_records(8 if args.quick else 32, seed=1))
    print(f"model {params / 1e6:.1f}M parameters, {steps} steps, batch 4 per member, sweep lr {list(LRS)} x r "
          f"{list(RANKS)} (K=4)")
    from lorakit.config import load_run_config
    from lorakit.config.sweep import members

    rows = []
    for repeat in range(args.repeats):
        base = os.path.join(tmp, f"r{repeat}")
        os.makedirs(base)
        sweep_yaml = run_yaml(os.path.join(base, "sweep.yaml"), model_dir, train, validation,
                              os.path.join(base, "sweep"), steps, {"lr": list(LRS), "r": list(RANKS)})
        alone = {}
        for m in members(load_run_config(sweep_yaml)):
            alone[m.name] = run_yaml(os.path.join(base, f"{m.name}.yaml"), model_dir, train, validation,
                                     os.path.join(base, m.name), steps, None, r=m.lora.r, lr=m.lr)
        order = ["sweep", "alone"] if repeat % 2 == 0 else ["alone", "sweep"]  # interleaved
        for side in order:
            if side == "sweep":
                result = timed_worker(sweep_yaml, "sweep")
                rows.append(dict(side="one sweep run (K=4)", repeat=repeat, wall=result["wall"],
                                 process=result["process"], busy=result["busy"], rss=result["rss_mib"]))
            else:
                results = [timed_worker(config, name) for name, config in alone.items()]
                walls = [r["wall"] for r in results]
                rows.append(dict(side="4 runs one after another", repeat=repeat, wall=sum(walls),
                                 process=sum(r["process"] for r in results),
                                 busy=sum(r["busy"] * w for r, w in zip(results, walls)) / sum(walls),
                                 rss=max(r["rss_mib"] for r in results)))
        diff = adapters_differ(os.path.join(base, "sweep"), {n: os.path.join(base, n) for n in alone})
        rows[-1]["diff"] = rows[-2]["diff"] = diff
    print(f"\n{'side':<26} {'repeat':>6} {'run s':>7} {'process s':>9} {'cpu%':>5} {'peak RSS MiB':>13} "
          f"{'max |diff|':>11}")
    for row in rows:
        print(f"{row['side']:<26} {row['repeat']:>6} {row['wall']:>7.1f} {row['process']:>9.1f} "
              f"{100 * row['busy']:>5.0f} {row['rss']:>13.0f} {row['diff']:>11.2e}")
    sweep = [r for r in rows if r["side"].startswith("one")]
    seq = [r for r in rows if r["side"].startswith("4")]
    for key, what in (("wall", "run (load to save)"), ("process", "whole processes")):
        best_sweep, best_seq = min(r[key] for r in sweep), min(r[key] for r in seq)
        print(f"{what}, best of {args.repeats}: 4 runs / one sweep = {best_seq / best_sweep:.2f}x")
    print(f"peak memory: sweep / one run = {max(r['rss'] for r in sweep) / max(r['rss'] for r in seq):.2f}x")


if __name__ == "__main__":
    main()
