"""Validation loss of lorakit's training against PEFT + the Hugging Face `Trainer` on the same budget (issue 15).

Both sides fine-tune the same base model on the same instruction data for the same number of optimizer steps
and batch size; both adapters are then scored by the same code, lorakit's evaluation (`lorakit eval`'s path:
load_base_model + load_adapter + prepare + lorakit.train.evaluate), on the same held-out records. Every
configuration runs once per seed, each run in a fresh process, the two sides interleaved seed by seed.

Model: the quickstart's shipped base (src/lorakit/quickstart/assets/model: a 1.24M-parameter Llama pre-trained
on chat about a small generated world of animals and numbers). Data: generated here, seeded, from the same world
(scripts/make_quickstart_assets.py): seven instruction kinds the base was not trained on, with answers of 4-43
tokens (prose from a JSON record, the quickstart's JSON records, which listed animals live somewhere, counting
down, spelling, everything about an animal, numbers in words); 1,822 training and 200 held-out records, no
prompt in both. Both sides train on identical token ids and prompt masks (the Trainer side takes lorakit's data
preparation, as bench/train_throughput.py does).

Configurations (--configs):
  lk-default   lorakit defaults on the budget: r 8, alpha 8, q/v, lr 2e-4 cosine, dtype auto (bf16 on CPUs with
               bf16 matrix units), LoRA matmuls in bf16 (speed.adapter_compute auto), random batches (grouped
               by length only among the micro-batches of one step, which with grad_accum 1 is none)
  pf-default   PEFT + Trainer defaults on the budget: LoraConfig() (r 8, alpha 8, q/v), lr 5e-5 linear, fp32,
               adamw_torch_fused, random sampler
  lk-matched   the issue's settings: r 16, alpha 32, every linear layer of the decoder, dropout 0, lr 1e-3
               constant, no warmup, bf16 base (lorakit's defaults otherwise)
  pf-matched   the same on PEFT + Trainer: model loaded in bf16, bf16=True, LoRA weights fp32 (PEFT's autocast)
Diagnostics (not run by default): lk-matched-fp32 / pf-matched-fp32 (fp32 base on both), lk-matched-adapter
(speed.adapter_compute: adapter: LoRA matmuls in fp32, as PEFT computes them without autocast),
lk-matched-grouped (steps of similar lengths: batches grouped by length in mega-batches of 50 batches, shuffled;
lorakit's first fix in issue 15), lk-matched-grouped-constnorm (the same with every step's summed loss divided by
the mean supervised tokens of a batch instead of its own: tells apart the weighting of short examples and the
sameness of a step's examples), lk-matched-sawtooth (lorakit's batch order before issue 15: each mega-batch's
batches longest to shortest), pf-matched-grouped (Trainer with train_sampling_strategy=group_by_length, which
has the same saw-tooth).

    python bench/quality.py --quick     # 2 seeds, 60 steps, defaults + matched: a smoke test (~1.5 min)
    python bench/quality.py             # 5 seeds, 150 steps of batch 8 (~6 min on an idle 2-core box)
    python bench/quality.py --configs lk-matched,pf-matched,lk-matched-sawtooth,lk-matched-adapter --seeds 5

Columns: val loss = mean token cross-entropy on the held-out records (fp32 scoring, --eval-dtype), mean +- std
over seeds and each seed's; train s = the training call alone (lorakit's fit, which
ends with a checkpoint and a loss plot, ~1 s here; Trainer.train with save_strategy="no"); run s = the worker
process from its start to the adapter on disk: imports, model load, data preparation, wrapping, training, save
(lorakit: run_training from a YAML; PEFT: a script's worth of calls); cpu% = process CPU time / (wall * threads)
over run s (well below ~90: another process competed for the cores, and the times are not comparable);
train loss = the mean of the steps' training losses (lorakit's per-step losses, the Trainer's training_loss).
"""
import argparse, json, os, random, statistics, sys, tempfile
from pathlib import Path

import harness

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "lorakit" / "quickstart" / "assets"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MATCHED = dict(r=16, alpha=32, targets=ALL_LINEAR, lr=1e-3, schedule="constant")
CONFIGS = {
    "lk-default": ("lorakit", {}),
    "pf-default": ("peft", {}),
    "lk-matched": ("lorakit", {**MATCHED}),
    "pf-matched": ("peft", {**MATCHED, "bf16": True}),
    "lk-matched-fp32": ("lorakit", {**MATCHED, "dtype": "float32"}),
    "pf-matched-fp32": ("peft", {**MATCHED}),
    "lk-matched-adapter": ("lorakit", {**MATCHED, "adapter_compute": "adapter"}),
    "lk-matched-grouped": ("lorakit", {**MATCHED, "order": "grouped"}),
    "lk-matched-grouped-constnorm": ("lorakit", {**MATCHED, "order": "grouped", "norm": "constant"}),
    "lk-matched-sawtooth": ("lorakit", {**MATCHED, "order": "sawtooth"}),
    "pf-matched-grouped": ("peft", {**MATCHED, "bf16": True, "grouped": True}),
}
PAIRS = [("defaults", "lk-default", "pf-default"), ("matched bf16", "lk-matched", "pf-matched"),
         ("matched fp32", "lk-matched-fp32", "pf-matched-fp32")]
DEFAULT_CONFIGS = "lk-default,pf-default,lk-matched,pf-matched"


# ----------------------------------------------------------------------------- data (driver)
def _world_module():
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_quickstart_assets as qs
    return qs


def instruction(rng: random.Random, qs, world: dict) -> tuple[str, str]:
    """One (prompt, answer) of the bench task; answers are 4-43 tokens with the quickstart's tokenizer."""
    a = rng.choice(qs.ANIMALS)
    facts = world[a]
    kind = rng.randrange(7)
    if kind == 0:
        c, legs, h = rng.choice(qs.COLORS), rng.choice(qs.LEGS), rng.choice(qs.HOMES)
        record = json.dumps({"animal": a, "color": c, "legs": legs, "home": h})
        return f"Describe this record: {record}", f"The {a} is {c}, has {legs} legs and lives in the {h}."
    if kind == 1:
        user, reply = qs.task_record(a, rng.choice(qs.COLORS), rng.choice(qs.LEGS), rng.choice(qs.HOMES),
                                     rng.randrange(len(qs.TEMPLATES)), rng.randrange(len(qs.INSTRUCTIONS)))["messages"]
        return user["content"], reply["content"]
    if kind == 2:
        h = rng.choice(qs.HOMES)
        names = rng.sample(qs.ANIMALS, rng.randint(2, 8))
        found = [f"the {b}" for b in names if world[b]["home"] == h]
        said = "none of them" if not found else " and ".join(filter(None, [", ".join(found[:-1]), found[-1]]))
        return f"Which of these live in the {h}: {', '.join(names)}?", said[0].upper() + said[1:] + "."
    if kind == 3:
        x = rng.randrange(4, 21)
        y = max(0, x - rng.randrange(2, 13))
        return f"Count down from {x} to {y}.", ", ".join(str(i) for i in range(x, y - 1, -1)) + "."
    if kind == 4:
        ask = rng.choice([f"Spell the word {a}.", f"How do you spell {a}?", f"Spell {a} letter by letter."])
        return ask, "-".join(a) + "."
    if kind == 5:
        ask = rng.choice([f"Tell me everything about the {a}.", f"Give me all facts about the {a}.",
                          f"What is there to know about the {a}?"])
        return ask, (f"The {a} is {facts['color']} and has {facts['legs']} legs. It lives in the {facts['home']}, "
                     f"eats {facts['food']} and says \"{facts['sound']}\".")
    x = rng.randrange(0, 15)
    y = x + rng.randrange(1, 7)
    return f"Write the numbers from {x} to {y} in words.", ", ".join(qs.NUM_WORDS[i] for i in range(x, y + 1)) + "."


def build_data(tmp: str, n_train: int, n_val: int, seed: int = 15) -> tuple[str, str]:
    """train.jsonl and val.jsonl (messages format) under `tmp`; no prompt is in both."""
    qs = _world_module()
    world = qs.make_world(random.Random(qs.SEED))  # the world the base model was pre-trained on
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < n_train + n_val:
        user, answer = instruction(rng, qs, world)
        if user in seen:
            continue
        seen.add(user)
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    rng.shuffle(rows)  # kinds with few distinct prompts run out first: without this they would miss the held-out part
    paths = []
    for name, part in (("train", rows[:n_train]), ("val", rows[n_train:])):
        paths.append(os.path.join(tmp, f"{name}.jsonl"))
        with open(paths[-1], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    return paths[0], paths[1]


# ----------------------------------------------------------------------------- worker side
def sawtooth_batches(self, epoch: int) -> list[list[int]]:
    """lorakit's LengthGroupedBatchSampler.batches before issue 15 (diagnostic lk-matched-sawtooth): the batches
    of each mega-batch in order, longest to shortest, with only the longest batch moved to the front."""
    rng = random.Random(f"lorakit-batches:{self.seed}:{epoch}")
    order = list(range(len(self.lengths)))
    rng.shuffle(order)
    mega = self.batch_size * 50
    order = [i for k in range(0, len(order), mega) for i in sorted(order[k:k + mega], key=lambda j: -self.lengths[j])]
    out = [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
    longest = max(range(len(out)), key=lambda k: max(self.lengths[i] for i in out[k]))
    out[0], out[longest] = out[longest], out[0]
    return out


def lorakit_worker(args, opts: dict, out_dir: str) -> dict:
    import yaml
    import lorakit.recipes.sft as run_mod
    from lorakit.config import load_run_config
    from lorakit.data import LengthGroupedBatchSampler

    if opts.get("order") == "sawtooth":
        LengthGroupedBatchSampler.batches = sawtooth_batches
    elif opts.get("order") == "grouped":
        import lorakit.train.objectives.sft as sft_mod
        real_iter = sft_mod.iter_batches
        sft_mod.iter_batches = lambda *a, group=None, **kw: real_iter(*a, group=50, **kw)
    lora = {"lora_dropout": 0.0}
    if "r" in opts:
        lora.update(r=opts["r"], lora_alpha=opts["alpha"], target_modules=opts["targets"])
    train = {"max_steps": args.steps, "batch_size": opts.get("batch", args.batch), "seed": args.seed,
             "log_every": 10 ** 6}
    if "lr" in opts:
        train.update(lr=opts["lr"], lr_schedule=opts["schedule"])
    cfg = {"model": {"name_or_path": args.model_dir, **({"dtype": opts["dtype"]} if "dtype" in opts else {})},
           "lora": lora, "data": {"train": args.train, **({"packing": True, "max_seq_len": opts["max_seq_len"]}
                                                           if opts.get("packing") else {})},
           "train": train,
           "speed": {"adapter_compute": opts.get("adapter_compute", "auto")}, "output_dir": out_dir}
    path = os.path.join(args.tmp, f"run-{args.config}-{args.seed}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    real_fit, seen = run_mod.fit, {}

    def fit(model, *a, **kw):  # only to time the training call alone
        clock = harness.CpuClock().start()
        try:
            return real_fit(model, *a, **kw)
        finally:
            timed = clock.stop()
            seen.update(train_s=timed["wall"], train_busy=timed["busy"], dtype=str(next(model.model.parameters()).dtype))

    if opts.get("norm") == "constant":  # diagnostic: every batch's summed loss over the same number
        import lorakit.train.objectives.sft as sft_mod
        real_supervised = sft_mod.supervised_tokens

        def fit(model, train, *a, _inner=fit, **kw):  # train: the run's objective (LanguageModeling)
            mean = statistics.mean(sum(t != -100 for t in e.labels[1:]) for e in train.data.examples) * args.batch
            sft_mod.supervised_tokens = lambda batch: mean if real_supervised(batch) else 0
            return _inner(model, train, *a, **kw)
    run_mod.fit = fit
    result = run_mod.run_training(load_run_config(path), log=lambda line: None)
    shown = ("lora", "train", "speed", *(("data",) if opts.get("packing") else ()))
    return dict(adapter=str(result.adapter_dir), train_s=seen["train_s"], train_busy=seen["train_busy"], train_loss=statistics.mean(result.losses),
                settings=f"yaml {json.dumps({k: cfg[k] for k in shown}, separators=(',', ':'))}; "
                         f"base {seen['dtype']}")


def peft_worker(args, opts: dict, out_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments,
                              set_seed)
    from lorakit.data import DataOptions, prepare

    set_seed(args.seed)  # before get_peft_model, as HF's example scripts do: the LoRA init draws from it
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    load = torch.bfloat16 if opts.get("bf16") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=load)
    # identical token ids and prompt masks to lorakit's (same template and masking code)
    data = prepare(args.train, tok, DataOptions())
    ds = Dataset.from_dict({"input_ids": [e.input_ids for e in data.examples],
                            "labels": [e.labels for e in data.examples]})
    lora = dict(r=opts["r"], lora_alpha=opts["alpha"], target_modules=opts["targets"]) if "r" in opts else {}
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    kw = dict(per_device_train_batch_size=args.batch, max_steps=args.steps, seed=args.seed)
    if "lr" in opts:
        kw.update(learning_rate=opts["lr"], lr_scheduler_type=opts["schedule"])
    if opts.get("bf16"):
        kw["bf16"] = True
    if opts.get("grouped"):
        kw["train_sampling_strategy"] = "group_by_length"
    targs = TrainingArguments(output_dir=out_dir, report_to="none", save_strategy="no", use_cpu=True,
                              disable_tqdm=True, logging_strategy="no", **kw)
    trainer = Trainer(model=model, args=targs, train_dataset=ds, data_collator=DataCollatorForSeq2Seq(tok, padding=True))
    train_clock = harness.CpuClock().start()
    output = trainer.train()
    timed = train_clock.stop()
    adapter = os.path.join(out_dir, "adapter")
    model.save_pretrained(adapter)
    lora_dtype = next(p.dtype for n, p in model.named_parameters() if "lora_A" in n)
    settings = (f"LoraConfig({', '.join(f'{k}={v!r}' for k, v in lora.items())}); TrainingArguments("
                f"{', '.join(f'{k}={v!r}' for k, v in kw.items())}); base {str(load).removeprefix('torch.')}, LoRA "
                f"{str(lora_dtype).removeprefix('torch.')}; optim {targs.optim}")
    return dict(adapter=adapter, train_s=timed["wall"], train_busy=timed["busy"], train_loss=output.training_loss,
                settings=settings)


def score(model_dir: str, adapter: str | None, val: str, dtype: str) -> float:
    """Mean token loss on `val`, by `lorakit eval`'s code path (its default batch size, 4)."""
    from lorakit.base_model import load_base_model
    from lorakit.config import ModelConfig
    from lorakit.data import DataOptions, iter_batches, prepare
    from lorakit.lora import load_adapter
    from lorakit.train.evaluate import evaluate

    loaded = load_base_model(ModelConfig(name_or_path=model_dir, dtype=dtype), log=lambda line: None)
    model = load_adapter(loaded.model, adapter) if adapter else loaded.model
    data = prepare(val, loaded.tokenizer, DataOptions())
    return evaluate(model, iter_batches(data, 4, dtype=loaded.dtype)).loss


def worker(args):
    clock = harness.CpuClock().start()  # before the heavy imports: run s is what a user waits for
    import torch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.config == "base":
        print("RESULT " + json.dumps({"val_loss": score(args.model_dir, None, args.val, args.eval_dtype)}), flush=True)
        return
    side, opts = CONFIGS[args.config]
    out_dir = os.path.join(args.tmp, f"out-{args.config}-{args.seed}")
    out = (lorakit_worker if side == "lorakit" else peft_worker)(args, opts, out_dir)
    run = clock.stop()
    out.update(run_s=run["wall"], busy=run["busy"], val_loss=score(args.model_dir, out["adapter"], args.val, args.eval_dtype), side=side)
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- driver side
def run_worker(args, config: str, seed: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", config, "--seed", str(seed), "--model-dir",
           args.model_dir, "--train", args.train, "--val", args.val, "--tmp", args.tmp, "--steps", str(args.steps),
           "--batch", str(args.batch), "--threads", str(args.threads), "--eval-dtype", args.eval_dtype]
    return harness.run_worker(cmd, f"{config} seed {seed}", extra_env={"TOKENIZERS_PARALLELISM": "false"})


def _mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} +- {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument("--seeds", type=int, default=5, help="runs per configuration, seeds 0..N-1")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--records", type=int, default=1822, help="training records (200 more are held out)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch default")
    ap.add_argument("--eval-dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    ap.add_argument("--quick", action="store_true", help="2 seeds of 60 steps: a smoke test")
    ap.add_argument("--worker", choices=["base", *CONFIGS], help=argparse.SUPPRESS)
    for hidden in ("--model-dir", "--train", "--val", "--tmp"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.config = args.worker
        return worker(args)

    configs = harness.chosen_configs(args.configs, CONFIGS)
    if args.quick:
        args.seeds, args.steps = 2, 60
    print(harness.environment_line(args.threads))
    print(harness.malloc_line())
    results: dict[str, list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp, args.model_dir = tmp, str(ASSETS / "model")
        args.train, args.val = build_data(tmp, args.records, 200)
        from transformers import AutoTokenizer
        from lorakit.data import DataOptions, prepare
        tok = AutoTokenizer.from_pretrained(args.model_dir)
        answers = sorted(sum(1 for t in e.labels if t != -100) for e in prepare(args.train, tok, DataOptions()).examples)
        print(f"model: quickstart base (1.24M params, fp32 on disk); data: {args.records} train / 200 held-out "
              f"instruction records, answer tokens min {answers[0]} median {answers[len(answers) // 2]} max "
              f"{answers[-1]}; {args.steps} steps of batch {args.batch}; seeds 0-{args.seeds - 1}; scored in "
              f"{args.eval_dtype} by lorakit's evaluate")
        base = harness.run_worker([sys.executable, os.path.abspath(__file__), "--worker", "base", "--model-dir",
                                   args.model_dir, "--train", args.train, "--val", args.val, "--tmp", tmp,
                                   "--eval-dtype", args.eval_dtype], "base")
        print(f"base model (no adapter): val loss {base['val_loss']:.4f}")
        hdr = f"{'config':28} {'seed':>4} {'val loss':>8} {'train s':>7} {'run s':>6} {'cpu%':>4} {'train loss':>10}"
        print(hdr + "\n" + "-" * len(hdr), flush=True)
        for seed in range(args.seeds):  # interleaved: every config once per seed
            for config in configs:
                r = run_worker(args, config, seed)
                results[config].append(r)
                print(f"{config:28} {seed:4d} {r['val_loss']:8.4f} {r['train_s']:7.1f} {r['run_s']:6.1f} "
                      f"{r['busy'] * 100:4.0f} {r['train_loss']:10.4f}", flush=True)
    print("\nsummary (val loss over seeds; times are means)")
    hdr = f"{'config':28} {'val loss mean +- std':>20} {'train s':>7} {'run s':>6} {'cpu%':>4}  per seed"
    print(hdr + "\n" + "-" * len(hdr))
    for config in configs:
        rs = results[config]
        print(f"{config:28} {_mean_std([r['val_loss'] for r in rs]):>20} "
              f"{statistics.mean(r['train_s'] for r in rs):7.1f} {statistics.mean(r['run_s'] for r in rs):6.1f} "
              f"{statistics.mean(r['busy'] for r in rs) * 100:4.0f}  {' '.join(format(r['val_loss'], '.4f') for r in rs)}")
    print("\nlorakit / PEFT (val loss: ratio of means and mean difference; lower is better for lorakit)")
    for label, k, p in PAIRS:
        if results.get(k) and results.get(p):
            a, b = results[k], results[p]
            la, lb = statistics.mean(r["val_loss"] for r in a), statistics.mean(r["val_loss"] for r in b)
            print(f"  {label:14} {k:>16} / {p:16} val loss {la / lb:.3f}x ({la - lb:+.4f})   train s "
                  f"{statistics.mean(r['train_s'] for r in a) / statistics.mean(r['train_s'] for r in b):.2f}x   run s "
                  f"{statistics.mean(r['run_s'] for r in a) / statistics.mean(r['run_s'] for r in b):.2f}x")
    print("\nsettings")
    for config in configs:
        print(f"  {config}: {results[config][0]['settings']}")


if __name__ == "__main__":
    main()
