"""DPO adapter quality at the same budget: lorakit's preference recipe against TRL's DPOTrainer + PEFT.

The task is scripts/check_preference_task.py's: examples/preference (1200 training pairs, 200 held out; chosen =
the correct JSON record, rejected = the same record with a wrong "legs") on the quickstart model after SFT (the
quickstart run, 1000 steps, merged; --sft DIR reuses a merged model, and OUT/sft/merged is reused when present).
Each side trains a fresh LoRA adapter on the SFT model with the check's settings, for each seed:
  r 8, alpha 16, dropout 0, every linear layer; 150 steps of 16 pairs; AdamW lr 3.5e-3, 15 warm-up steps then
  cosine, weight decay 4, gradient clipping 1.0; DPO sigmoid loss, beta 2; reference = the SFT model (adapter
  disabled), its log-probs precomputed; completions cut at the check's max_completion_len (just past the legs
  value).
  lorakit  the real recipe: a run config (objective dpo) -> lorakit.recipes.run_recipe, reading the JSONL itself
  trl      trl.DPOTrainer with a peft.LoraConfig and a DPOConfig with the same settings; its dataset holds the
           token ids lorakit's data step produced for the same file (prompt_ids / chosen_ids / rejected_ids, the
           columns of TRL's own tokenization; the script checks they are lorakit's), so both sides see the same
           tokens and only the training differs. Each side keeps its own LoRA init and batch order (seeded).
Each (side, seed) runs in a fresh process, sides interleaved. Afterwards one judge scores every adapter the same
way: PEFT loads it onto the SFT model (lorakit's adapters are PEFT adapters), a plain forward gives each held-out
pair's summed completion log-probs, and
  held-out DPO loss  mean of -log sigmoid(beta * ((policy chosen - rejected) - (SFT chosen - rejected)))
  reward accuracy    pairs whose chosen reward beta * (policy - SFT log-prob) is strictly above rejected's
  greedy answers     on the first --generate held-out prompts: the legs value right, the other fields right
                     (valid JSON), the whole record exact (check_preference_task's scoring)
The table gives the mean and every seed's value per side, and lorakit - TRL for the loss and the accuracy. Wall
times are printed with cpu% (process CPU / (wall x threads)) for information; they are a benchmark figure only
from an idle machine (bench/preference_throughput.py is the speed benchmark).

    python bench/preference_quality.py                       # seeds 0,1,2 (about 15 minutes on 2 cores)
    python bench/preference_quality.py --sft runs/qs --seeds 0,1
    python bench/preference_quality.py --smoke               # 4 SFT + 4 DPO steps, one seed: checks the script
"""
import argparse, json, sys, time
from pathlib import Path

import harness

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import check_preference_task as task  # noqa: E402  (the task: data, SFT stage, settings, greedy scoring)

SETTINGS = dict(steps=task.DPO_STEPS, batch=task.BATCH, lr=task.LR, warmup=task.WARMUP, weight_decay=task.WEIGHT_DECAY,
                beta=task.BETA, r=task.RANK, alpha=2 * task.RANK)


# ----------------------------------------------------------------------------- data (both sides and the judge)
def pairs_as_ids(tokenizer, path: Path, cut: int) -> list[dict]:
    """Each pair of `path` as lorakit's data step tokenizes and cuts it (the judge scores these ids too)."""
    return [{"prompt_ids": list(p.prompt_ids), "chosen_ids": list(p.chosen_ids), "rejected_ids": list(p.rejected_ids)}
            for p in task._pairs(path, tokenizer, cut).examples]


# ----------------------------------------------------------------------------- workers (one side, one seed)
def lorakit_worker(args) -> dict:
    import lorakit.recipes.preference as recipe
    from lorakit.config import run_config_from_dict
    from lorakit.recipes import run_recipe

    s = SETTINGS | {"steps": args.steps}
    config = run_config_from_dict({
        "model": {"name_or_path": args.sft_model, "dtype": "float32"},
        "objective": "dpo",
        "lora": {"r": s["r"], "lora_alpha": s["alpha"], "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": str(task.DATA / "train.jsonl"), "max_seq_len": task.MAX_SEQ_LEN},
        "train": {"max_steps": s["steps"], "batch_size": s["batch"], "lr": s["lr"], "lr_schedule": "cosine",
                  "warmup_steps": min(s["warmup"], s["steps"] // 4), "weight_decay": s["weight_decay"],
                  "max_grad_norm": 1.0, "save_every": s["steps"], "keep_checkpoints": 1, "log_every": 10,
                  "seed": args.seed},
        "preference": {"beta": s["beta"], "loss_type": "sigmoid", "max_completion_len": args.cut,
                       "reference": {"precompute": True}},
        "output_dir": str(args.out),
    })
    seen = {}
    real_fit = recipe.fit

    def fit(model, objective, cfg, output_dir, **kw):  # the data lorakit trains on must be what TRL gets
        seen["ids"] = [{"prompt_ids": list(p.prompt_ids), "chosen_ids": list(p.chosen_ids), "rejected_ids": list(p.rejected_ids)}
                       for p in objective.data.examples]
        return real_fit(model, objective, cfg, output_dir, **kw)

    recipe.fit = fit
    clock = harness.CpuClock().start()
    adapter = run_recipe(config, resume="never", overwrite=True, log=lambda line: None).adapter_dir
    timing = clock.stop()
    if seen["ids"] != json.loads(Path(args.pairs).read_text()):
        raise SystemExit("lorakit's recipe tokenized the pairs differently from the ids given to TRL")
    return dict(adapter=str(adapter), **timing)


def trl_worker(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on a dataset already holding prompt_ids / chosen_ids / rejected_ids: only its text
        preparation is skipped."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    s = SETTINGS | {"steps": args.steps}
    tokenizer = AutoTokenizer.from_pretrained(args.sft_model)
    model = AutoModelForCausalLM.from_pretrained(args.sft_model, dtype=torch.float32)
    dataset = Dataset.from_list(json.loads(Path(args.pairs).read_text()))
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=s["r"], lora_alpha=s["alpha"], lora_dropout=0.0,
                             target_modules="all-linear")
    targs = DPOConfig(output_dir=str(args.out), max_steps=s["steps"], per_device_train_batch_size=s["batch"],
                      learning_rate=s["lr"], lr_scheduler_type="cosine",
                      warmup_steps=min(s["warmup"], s["steps"] // 4), weight_decay=s["weight_decay"],
                      max_grad_norm=1.0, beta=s["beta"], loss_type=["sigmoid"], precompute_ref_log_probs=True,
                      max_length=None, bf16=False, use_cpu=True, report_to=[], save_strategy="no",
                      logging_steps=10, seed=args.seed, disable_tqdm=True)
    clock = harness.CpuClock().start()
    trainer = PretokenizedDPOTrainer(model=model, args=targs, train_dataset=dataset, processing_class=tokenizer,
                                     peft_config=peft_config)
    trainer.train()
    timing = clock.stop()
    adapter = Path(args.out) / "adapter"
    trainer.save_model(str(adapter))
    return dict(adapter=str(adapter), **timing)


# ----------------------------------------------------------------------------- the judge
def sequence_log_probs(model, rows: list[tuple[list[int], list[int]]]) -> list[float]:
    """Summed log-probs of each completion given its prompt: one plain right-padded forward per 50 rows."""
    import torch

    out = []
    for start in range(0, len(rows), 50):
        chunk = rows[start:start + 50]
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, (p, c) in enumerate(chunk):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            mask[i, :len(p) + len(c)] = 1
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for i, (p, c) in enumerate(chunk):
            positions = torch.arange(len(p) - 1, len(p) + len(c) - 1)  # the logits that predict the completion
            out.append(float(logps[i, positions, torch.tensor(c)].sum()))
    return out


def pair_margins(model, pairs: list[dict]) -> list[float]:
    chosen = sequence_log_probs(model, [(p["prompt_ids"], p["chosen_ids"]) for p in pairs])
    rejected = sequence_log_probs(model, [(p["prompt_ids"], p["rejected_ids"]) for p in pairs])
    return [c - r for c, r in zip(chosen, rejected)]


def judge(sft_model: str, adapters: dict, heldout_ids: list[dict], generate: int) -> dict:
    """{key: {loss, accuracy, legs, others, exact, n}} for each adapter, and "sft" (greedy only)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    beta = SETTINGS["beta"]
    tokenizer = AutoTokenizer.from_pretrained(sft_model)
    heldout = task._read(task.DATA / "heldout.jsonl")[:generate]
    prompts = [row["prompt"] for row in heldout]

    def load():
        return AutoModelForCausalLM.from_pretrained(sft_model, dtype=torch.float32).eval()

    sft = load()
    reference = pair_margins(sft, heldout_ids)
    results = {"sft": task._score(task.greedy(sft, tokenizer, prompts), heldout) if generate else {}}
    for key, adapter in adapters.items():
        policy = PeftModel.from_pretrained(load(), adapter).eval()
        margins = pair_margins(policy, heldout_ids)
        logits = [beta * (m - r) for m, r in zip(margins, reference)]
        loss = float(-torch.nn.functional.logsigmoid(torch.tensor(logits)).mean())
        results[key] = {"loss": loss, "accuracy": sum(x > 0 for x in logits) / len(logits),
                        **(task._score(task.greedy(policy, tokenizer, prompts), heldout) if generate else {})}
    return results


# ----------------------------------------------------------------------------- driver
def run_worker(args, side: str, seed: int, out: Path, sft_model: Path, pairs: Path, cut: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--seed", str(seed), "--out", str(out / f"{side}-seed{seed}"),
           "--sft-model", str(sft_model), "--pairs", str(pairs), "--cut", str(cut), "--steps", str(args.steps),
           "--threads", str(args.threads)]
    return harness.run_worker(cmd, f"{side} seed {seed}")


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def report(scores: dict, timings: dict, seeds: list[int], generate: int) -> None:
    def row(name: str, metric: str, fmt: str) -> str:
        mean_fmt = ".1f" if fmt == "d" else fmt
        cells = [f"{mean([scores[(side, s)][metric] for s in seeds]):{mean_fmt}} ("
                 + " / ".join(f"{scores[(side, s)][metric]:{fmt}}" for s in seeds) + ")" for side in ("lorakit", "trl")]
        return f"| {name} | {cells[0]} | {cells[1]} |"

    print(f"\n| held-out metric (mean (seeds {' / '.join(map(str, seeds))})) | lorakit | TRL DPOTrainer + PEFT |")
    print("|---|---|---|")
    print(row("DPO loss (lower is better)", "loss", ".4f"))
    print(row("reward accuracy", "accuracy", ".3f"))
    if generate:
        for metric, what in (("legs", "legs right"), ("others", "other fields right"), ("exact", "record exact")):
            print(row(f"greedy: {what} (of {generate}; SFT model: {scores['sft'][metric]})", metric, "d"))
    loss_gap = mean([scores[("lorakit", s)]["loss"] - scores[("trl", s)]["loss"] for s in seeds])
    acc_gap = mean([scores[("lorakit", s)]["accuracy"] - scores[("trl", s)]["accuracy"] for s in seeds])
    print(f"\nlorakit - TRL, mean over seeds: DPO loss {loss_gap:+.4f}, reward accuracy {acc_gap:+.3f}")
    print("wall s (cpu%), training incl. reference precompute: " + ", ".join(
        f"{side} seed {s} {timings[(side, s)]['wall']:.0f} ({timings[(side, s)]['busy']:.0%})"
        for s in seeds for side in ("lorakit", "trl")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/preference-quality"), help="work directory")
    ap.add_argument("--sft", type=Path, help="reuse DIR/merged (an earlier `lorakit quickstart --out DIR`)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=SETTINGS["steps"], help="DPO steps per run")
    ap.add_argument("--generate", type=int, default=50, help="held-out prompts answered greedily (0: none)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (default 1: the model has 1.2M parameters; see the check)")
    ap.add_argument("--smoke", action="store_true", help="4 SFT steps, 4 DPO steps, seed 0, 5 greedy prompts")
    ap.add_argument("--worker", choices=["lorakit", "trl"], help=argparse.SUPPRESS)
    for hidden in ("--seed", "--sft-model", "--pairs", "--cut"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    if args.worker:
        args.seed, args.cut = int(args.seed), int(args.cut)
        result = (lorakit_worker if args.worker == "lorakit" else trl_worker)(args)
        print("RESULT " + json.dumps(result))
        return 0

    if args.smoke:
        args.seeds, args.steps, args.generate = "0", 4, 5
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(harness.environment_line(args.threads))
    print(f"settings: {SETTINGS | {'steps': args.steps}}; seeds {seeds}")

    if args.sft is not None:
        sft_model = args.sft / "merged"
    elif (out / "sft" / "merged" / "config.json").is_file() and not args.smoke:
        sft_model = out / "sft" / "merged"
        print(f"SFT: reusing {sft_model}")
    else:
        steps = 4 if args.smoke else 1000
        print(f"SFT: the quickstart run, {steps} steps, merged")
        sft_model = task.train_sft(out, steps, lambda line: None)

    tokenizer, _ = task._load(sft_model)
    cut = task.completion_cut(tokenizer, task.DATA / "train.jsonl", task.DATA / "heldout.jsonl")
    pairs = out / "train_ids.json"
    pairs.write_text(json.dumps(pairs_as_ids(tokenizer, task.DATA / "train.jsonl", cut)))
    heldout_ids = pairs_as_ids(tokenizer, task.DATA / "heldout.jsonl", cut)

    timings, adapters = {}, {}
    for seed in seeds:
        for side in ("lorakit", "trl"):
            started = time.perf_counter()
            timings[(side, seed)] = run_worker(args, side, seed, out, sft_model, pairs, cut)
            adapters[(side, seed)] = timings[(side, seed)]["adapter"]
            print(f"  {side} seed {seed}: trained in {time.perf_counter() - started:.0f} s", flush=True)
    scores = judge(str(sft_model), adapters, heldout_ids, args.generate)
    report(scores, timings, seeds, args.generate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
