"""GRPO adapter quality at the same budget: lorakit's grpo recipe against TRL's GRPOTrainer + PEFT.

The task is scripts/check_grpo_task.py's: the quickstart model after 200 SFT steps (merged; OUT/sft/merged is
reused when present, --sft DIR names another), which writes the JSON records of examples/preference but breaks
about a third of them; the reward is 1 for a JSON object with exactly animal, color, legs (an integer) and home,
else 0 (one Python function, `schema_reward` below, on both sides). Each side trains a fresh LoRA adapter with
the check's settings, for each seed:
  r 8, alpha 16, dropout 0, every linear layer; 60 steps of 4 prompts x 8 completions sampled at temperature 0.2
  (top_p 1, no top-k), up to 48 tokens; loss dapo, epsilon 0.2, beta 0, num_iterations 1, scale_rewards group;
  AdamW lr 1e-3 constant, no warm-up, no weight decay, gradient clipping 1.0.
  lorakit  the real recipe: a run config (objective grpo) -> lorakit.recipes.run_recipe; its engine rolls out
  trl      trl.GRPOTrainer with a peft.LoraConfig and a GRPOConfig with the same settings (no vLLM: it generates
           with the PEFT model's `generate`); the prompts as one-turn conversations, which TRL renders with the
           same chat template (the script checks the token ids are lorakit's).
Each (side, seed) runs in a fresh process, sides interleaved. Afterwards one judge scores every adapter the same
way: lorakit.lora.load_adapter onto the SFT model, greedy answers (transformers' generate, check_grpo_task's
`greedy`) to the 100 held-out prompts, and the share that the reward accepts. The table gives each side's mean
and every seed's value, with the training wall time and cpu% (process CPU / (wall x threads)); a time counts only
at cpu% >= 90 (bench/grpo_step.py is the speed benchmark).

    python bench/grpo_quality.py                      # seeds 0,1,2
    python bench/grpo_quality.py --seeds 0 --steps 30
    python bench/grpo_quality.py --smoke              # 4 SFT + 3 GRPO steps, one seed, 10 held-out prompts
"""
import argparse, json, sys
from pathlib import Path

import harness

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_grpo_task as check  # noqa: E402  (the task: prompts, schema, SFT stage, settings)
import check_preference_task as task  # noqa: E402  (loading and greedy answers)

SETTINGS = dict(steps=check.STEPS, prompts=check.PROMPTS_PER_STEP, generations=check.GENERATIONS, lr=check.LR,
                r=check.RANK, alpha=2 * check.RANK, temperature=check.TEMPERATURE, max_completion=check.MAX_COMPLETION)


def schema_reward(prompt, completion, record) -> float:
    """The reward on both sides (and the judge's): 1.0 for a record of check_grpo_task.SCHEMA, else 0.0."""
    return check.schema_valid([completion])


def trl_reward(prompts, completions, **kwargs) -> list[float]:
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]  # conversational or plain
    return [schema_reward(None, text, None) for text in texts]


# ----------------------------------------------------------------------------- workers (one side, one seed)
def lorakit_worker(args) -> dict:
    from lorakit.config import run_config_from_dict
    from lorakit.recipes import run_recipe

    s = SETTINGS | {"steps": args.steps}
    config = run_config_from_dict({
        "model": {"name_or_path": args.sft_model, "dtype": "float32"},
        "objective": "grpo",
        "lora": {"r": s["r"], "lora_alpha": s["alpha"], "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": args.prompts, "max_seq_len": task.MAX_SEQ_LEN},
        "train": {"max_steps": s["steps"], "batch_size": s["prompts"], "lr": s["lr"], "lr_schedule": "constant",
                  "max_grad_norm": 1.0, "save_every": s["steps"], "keep_checkpoints": 1, "log_every": 10,
                  "seed": args.seed},
        "rl": {"num_generations": s["generations"], "temperature": s["temperature"], "top_p": 1.0,
               "max_completion_len": s["max_completion"], "loss_type": "dapo", "epsilon": 0.2, "beta": 0.0,
               "sample_every": None, "rewards": [{"function": "grpo_quality:schema_reward"}]},
        "output_dir": str(args.out),
    })
    clock = harness.CpuClock().start()
    adapter = run_recipe(config, resume="never", overwrite=True, log=lambda line: None).adapter_dir
    return dict(adapter=str(adapter), **clock.stop())


def trl_worker(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    s = SETTINGS | {"steps": args.steps}
    tokenizer = AutoTokenizer.from_pretrained(args.sft_model)
    model = AutoModelForCausalLM.from_pretrained(args.sft_model, dtype=torch.float32)
    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines()]
    expected = json.loads(Path(args.prompt_ids).read_text())
    for row, ids in zip(rows, expected):  # TRL renders a conversational prompt with the chat template
        got = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        if list(got) != ids:
            raise SystemExit(f"TRL's prompt ids differ from lorakit's for {row['prompt']!r}: {got} vs {ids}")
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows])
    targs = GRPOConfig(output_dir=str(args.out), max_steps=s["steps"],
                       per_device_train_batch_size=s["prompts"] * s["generations"], num_generations=s["generations"],
                       max_completion_length=s["max_completion"], temperature=s["temperature"], top_p=1.0, top_k=0,
                       learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                       max_grad_norm=1.0, loss_type="dapo", epsilon=0.2, beta=0.0, num_iterations=1,
                       scale_rewards="group", bf16=False, use_cpu=True, report_to=[], save_strategy="no",
                       logging_steps=10, seed=args.seed, disable_tqdm=True)
    clock = harness.CpuClock().start()
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=targs, train_dataset=dataset,
                          processing_class=tokenizer,
                          peft_config=LoraConfig(task_type="CAUSAL_LM", r=s["r"], lora_alpha=s["alpha"],
                                                 lora_dropout=0.0, target_modules="all-linear"))
    trainer.train()
    timing = clock.stop()
    adapter = Path(args.out) / "adapter"
    trainer.save_model(str(adapter))
    return dict(adapter=str(adapter), **timing)


# ----------------------------------------------------------------------------- the judge
def judge(sft_model: Path, adapters: dict, prompts: list[str]) -> dict:
    """{key: held-out reward of the greedy answers} for each adapter, and "sft" without one."""
    tokenizer, sft = task._load(sft_model)
    scores = {"sft": check.schema_valid(task.greedy(sft, tokenizer, prompts, SETTINGS["max_completion"]))}
    for key, adapter in adapters.items():
        _, policy = task._load(sft_model, adapter)
        scores[key] = check.schema_valid(task.greedy(policy, tokenizer, prompts, SETTINGS["max_completion"]))
    return scores


# ----------------------------------------------------------------------------- driver
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/grpo-quality"), help="work directory")
    ap.add_argument("--sft", type=Path, help="a merged SFT model (default: OUT/sft/merged, trained here)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=SETTINGS["steps"], help="GRPO steps per run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (the model has 1.2M parameters)")
    ap.add_argument("--smoke", action="store_true", help="4 SFT steps, 3 GRPO steps, seed 0, 10 held-out prompts")
    ap.add_argument("--worker", choices=["lorakit", "trl"], help=argparse.SUPPRESS)
    for hidden in ("--seed", "--sft-model", "--prompts", "--prompt-ids"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    if args.worker:
        args.seed = int(args.seed)
        result = (lorakit_worker if args.worker == "lorakit" else trl_worker)(args)
        print("RESULT " + json.dumps(result))
        return 0

    if args.smoke:
        args.seeds, args.steps = "0", 3
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(harness.environment_line(args.threads))
    print(f"settings: {SETTINGS | {'steps': args.steps}}; seeds {seeds}")
    if args.sft is not None:
        sft_model = args.sft
    elif (out / "sft" / "merged" / "config.json").is_file() and not args.smoke:
        sft_model = out / "sft" / "merged"
        print(f"SFT: reusing {sft_model}")
    else:
        steps = 4 if args.smoke else check.SFT_STEPS
        print(f"SFT: the quickstart run, {steps} steps, merged")
        sft_model = check.task.train_sft(out, steps, lambda line: None)

    train, heldout = check.write_prompts(out)
    prompts = [r["prompt"] for r in task._read(heldout)][:10 if args.smoke else None]
    from lorakit.config import DataConfig
    from lorakit.data.prompts import prepare_prompts
    tokenizer, _ = task._load(sft_model)
    ids = [p.ids for p in prepare_prompts(str(train), tokenizer, DataConfig(train=str(train), max_seq_len=task.MAX_SEQ_LEN),
                                          max_prompt_len=task.MAX_SEQ_LEN - SETTINGS["max_completion"]).records]
    prompt_ids = out / "train_prompt_ids.json"
    prompt_ids.write_text(json.dumps(ids))

    timings, adapters = {}, {}
    for seed in seeds:
        for side in ("lorakit", "trl"):
            cmd = [sys.executable, __file__, "--worker", side, "--seed", str(seed), "--out",
                   str(out / f"{side}-seed{seed}"), "--sft-model", str(sft_model), "--prompts", str(train),
                   "--prompt-ids", str(prompt_ids), "--steps", str(args.steps), "--threads", str(args.threads)]
            result = harness.run_worker(cmd, f"{side} seed {seed}")
            timings[(side, seed)], adapters[(side, seed)] = result, result["adapter"]
            print(f"  {side} seed {seed}: trained in {result['wall']:.0f} s (cpu {result['busy']:.0%})", flush=True)

    scores = judge(sft_model, adapters, prompts)
    print(f"\n| held-out greedy reward ({len(prompts)} prompts; mean (seeds {' / '.join(map(str, seeds))})) | "
          f"lorakit | TRL GRPOTrainer + PEFT |\n|---|---|---|")
    cells = [f"{sum(scores[(side, s)] for s in seeds) / len(seeds):.3f} ("
             + " / ".join(f"{scores[(side, s)]:.2f}" for s in seeds) + ")" for side in ("lorakit", "trl")]
    print(f"| after {args.steps} steps (SFT model: {scores['sft']:.2f}) | {cells[0]} | {cells[1]} |")
    walls = [f"{sum(timings[(side, s)]['wall'] for s in seeds) / len(seeds):.0f} s ("
             + " / ".join(f"{timings[(side, s)]['busy']:.0%}" for s in seeds) + " cpu)" for side in ("lorakit", "trl")]
    print(f"| training wall time, mean (cpu% per seed) | {walls[0]} | {walls[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
