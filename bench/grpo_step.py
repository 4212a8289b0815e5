"""GRPO step time and peak memory: lorakit's grpo recipe against TRL's GRPOTrainer + PEFT, rollout and update apart.

The same base model, prompts, reward function and LoRA settings go through
  lorakit  the real recipe: a run config (objective grpo) -> lorakit.recipes.run_recipe -> run_grpo; each step rolls
           out with lorakit's engine (continuous batching, KV cache, the adapter being trained) and updates
  trl      trl.GRPOTrainer with a peft.LoraConfig (no vLLM: TRL generates with the PEFT model's `generate`), at
           GRPOConfig's defaults (gradient checkpointing on); trl-nogc: the same with gradient checkpointing off
each in a fresh subprocess (bench/harness.py's allocator settings). Per step: wall time, the rollout's part
(lorakit: the objective's rollout_s; TRL: its _generate_and_score_completions, i.e. generation, reward and
advantages), the update's part (the rest), peak RSS, cpu% and oth% as in preference_throughput.py (a row counts
only at cpu% >= 90 and oth% <= 10), mean completion length (the comparison is fair only where the lengths match).

Setup (once, in a temp dir): a Llama-shaped model from a config with seeded random weights (fp32), a word-level
tokenizer over its vocabulary (t0, t1, ...; <pad> 0, <eos> 1) whose chat template is the bare message text, so
lorakit's rendered prompt and TRL's tokenized string prompt are the same ids; seeded prompts of --prompt-len
random tokens. Random weights rarely sample <eos>, so completions run to --completion-len on both sides (the
table shows the mean length). The reward is one function on both sides (distinct tokens / tokens), so groups
have spread and every completion is scored.

Settings on both sides: fp32, LoRA r=16 alpha=32 dropout 0 on q,k,v,o, lr 1e-5 constant, max_grad_norm 1, GRPO
loss dapo, beta 0 (no reference pass), num_iterations 1, temperature 1, top_p 1; each step 2 prompts x 8
completions (TRL: per_device_train_batch_size 16 completions, generation every step), 64-token prompts, 64-token
completions.

    python bench/grpo_step.py --smoke          # tiny model, 1 + 2 steps: checks the script
    python bench/grpo_step.py                  # preset 40m, 1 warm-up + 3 timed steps, one thread per worker
    python bench/grpo_step.py --sides lorakit,trl,trl-nogc
"""
import argparse, json, os, statistics, sys, tempfile, time

import harness
from preference_throughput import PRESETS, Probe, build_setup as build_model_and_tokenizer, invalid
from train_speed import git_rev, machine

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}<eos>{% endif %}{% endfor %}"
TARGET_SPEED = 2.0


def score(completion: str) -> float:
    """The reward on both sides: the share of distinct tokens (varies within a group, never fails)."""
    words = completion.split()
    return len(set(words)) / len(words) if words else 0.0


def lorakit_reward(prompt, completion, record):
    return score(completion)


def trl_reward(prompts, completions, **kwargs):
    return [score(c) for c in completions]


# ----------------------------------------------------------------------------- setup (driver)
def build_setup(tmp: str, shape: dict, n_prompts: int, prompt_len: int) -> tuple[str, str]:
    import torch
    from transformers import AutoTokenizer

    model_dir, _, _ = build_model_and_tokenizer(tmp, shape, 1, 4, 4)
    config_path = os.path.join(model_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["use_cache"] = True  # the DPO bench saves use_cache=False, which makes model.generate recompute everything
    with open(config_path, "w") as f:
        json.dump(config, f)
    # ... and so does the generation_config.json saved beside it, which model.generate reads first: without this,
    # TRL's rollout ran every decode step over the whole sequence (10x slower; the first measurement was wrong)
    generation_path = os.path.join(model_dir, "generation_config.json")
    if os.path.exists(generation_path):
        with open(generation_path) as f:
            generation = json.load(f)
        generation["use_cache"] = True
        with open(generation_path, "w") as f:
            json.dump(generation, f)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(2)
    prompts = [{"prompt": " ".join(f"t{i}" for i in torch.randint(3, shape["vocab"], (prompt_len,), generator=g).tolist())}
               for _ in range(n_prompts)]
    path = os.path.join(tmp, "prompts.jsonl")
    with open(path, "w") as f:
        f.write("".join(json.dumps(p) + "\n" for p in prompts))
    return model_dir, path


# ----------------------------------------------------------------------------- workers
def lorakit_worker(args, probe: Probe) -> dict:
    import torch
    import lorakit.recipes.grpo as recipe
    from lorakit.config import run_config_from_dict
    from lorakit.recipes import run_recipe

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    cfg = {"model": {"name_or_path": args.model_dir, "dtype": "float32"}, "objective": "grpo",
           "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": TARGETS},
           "data": {"train": args.prompts, "max_seq_len": args.prompt_len + args.completion_len + 8},
           "train": {"max_steps": args.warmup + args.steps, "batch_size": args.prompts_per_step, "lr": 1e-5,
                     "lr_schedule": "constant", "log_every": 1, "save_every": 1000, "memory_check": False},
           "rl": {"num_generations": args.generations, "max_completion_len": args.completion_len,
                  "loss_type": "dapo", "sample_every": None,
                  "rewards": [{"function": "grpo_step:lorakit_reward"}]},
           "output_dir": os.path.join(args.tmp, "out-lorakit")}
    rollout, lengths = {}, {}
    real_fit = recipe.fit

    def fit(model, objective, config, output_dir, **kw):
        def hook(event, info):
            if event == "step":
                probe.step(info["step"], tokens=int(info["tokens"]))
                rollout[info["step"]] = info["rollout_s"]
                lengths[info["step"]] = info["completion_length"]

        kw["hooks"] = [*kw.get("hooks", ()), hook]
        probe.begin()
        return real_fit(model, objective, config, output_dir, **kw)

    recipe.fit = fit
    run_recipe(run_config_from_dict(cfg), overwrite=True, log=lambda line: print(line, file=sys.stderr)
               if args.verbose else None)
    timed = range(args.warmup + 1, args.warmup + args.steps + 1)
    return dict(rollout_s=[rollout[s] for s in timed], completion_length=statistics.mean(lengths[s] for s in timed),
                settings=f"run config {json.dumps({k: cfg[k] for k in ('train', 'rl')}, separators=(',', ':'))}",
                threads=torch.get_num_threads())


def trl_worker(args, probe: Probe) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rollout: list[float] = []

    class Stamps(TrainerCallback):
        def on_train_begin(self, targs, state, control, **kw):
            probe.begin()

        def on_step_end(self, targs, state, control, **kw):
            probe.step(state.global_step)

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    assert model.generation_config.use_cache is not False, "model.generate would run without its KV cache"
    with open(args.prompts) as f:
        dataset = Dataset.from_list([json.loads(line) for line in f])
    rows = args.prompts_per_step * args.generations
    targs = GRPOConfig(output_dir=os.path.join(args.tmp, "out-trl"), max_steps=args.warmup + args.steps,
                       per_device_train_batch_size=rows, num_generations=args.generations,
                       max_completion_length=args.completion_len, learning_rate=1e-5, lr_scheduler_type="constant",
                       loss_type="dapo", beta=0.0, temperature=1.0, top_p=1.0, num_iterations=1, bf16=False,
                       use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
                       gradient_checkpointing=args.worker == "trl")  # trl: TRL's default; trl-nogc: off
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=targs, train_dataset=dataset,
                          processing_class=tok, callbacks=[Stamps()],
                          peft_config=LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=TARGETS))
    real = trainer._generate_and_score_completions

    def timed(*a, **k):
        started = time.perf_counter()
        out = real(*a, **k)
        rollout.append(time.perf_counter() - started)
        return out

    trainer._generate_and_score_completions = timed
    trainer.train()
    lengths = [row["completions/mean_length"] for row in trainer.state.log_history if "completions/mean_length" in row]
    return dict(rollout_s=rollout[args.warmup:args.warmup + args.steps],
                completion_length=statistics.mean(lengths[args.warmup:args.warmup + args.steps]),
                settings=f"GRPOConfig(per_device_train_batch_size={rows}, num_generations={args.generations}, "
                         f"max_completion_length={args.completion_len}, loss_type='dapo', beta=0.0, bf16=False, "
                         f"use_cpu=True); optim {targs.optim}; gradient_checkpointing={targs.gradient_checkpointing}",
                threads=torch.get_num_threads())


def worker(args) -> None:
    import torch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    probe = Probe(args.warmup, args.steps)
    out = (lorakit_worker if args.worker == "lorakit" else trl_worker)(args, probe)
    out.update(probe.result())
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- driver
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="40m", choices=list(PRESETS))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (1: cpu% then means the "
                                                            "side's own serial parts, not the other core idling)")
    ap.add_argument("--sides", default="lorakit,trl",
                    help="of: lorakit, trl (GRPOConfig defaults: gradient checkpointing on), trl-nogc (off)")
    ap.add_argument("--smoke", action="store_true", help="preset smoke, 1 + 2 steps, short prompts and completions")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--worker", choices=["lorakit", "trl", "trl-nogc"], help=argparse.SUPPRESS)
    for hidden in ("--model-dir", "--prompts", "--tmp"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.smoke:
        args.preset, args.steps, args.prompt_len, args.completion_len = "smoke", 2, 16, 16
    print(f"machine: {machine()}")
    print(harness.environment_line(args.threads) + f"  (git {git_rev()})")
    print(f"allocator: {harness.malloc_line()}")
    print(f"settings: preset {args.preset} {PRESETS[args.preset]}, fp32; each step {args.prompts_per_step} prompts x "
          f"{args.generations} completions, {args.prompt_len}-token prompts, up to {args.completion_len}-token "
          f"completions; LoRA r16 on {','.join(TARGETS)}; dapo, beta 0; {args.warmup} warm-up + {args.steps} timed steps")
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, prompts = build_setup(tmp, PRESETS[args.preset], 4 * args.prompts_per_step * (args.warmup + args.steps),
                                         args.prompt_len)
        for side in args.sides.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--model-dir", model_dir, "--prompts",
                   prompts, "--tmp", tmp, "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads",
                   str(args.threads), "--prompts-per-step", str(args.prompts_per_step), "--generations",
                   str(args.generations), "--prompt-len", str(args.prompt_len), "--completion-len",
                   str(args.completion_len)] + (["--verbose"] if args.verbose else [])
            r = harness.run_worker(cmd, side, extra_env={"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                                                         "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
            res[side] = r
            print(f"  ran {side}: {r['sec']:.2f} s/step, cpu {r['busy']:.0%}, others {r['others']:.0%}, "
                  f"peak {r['peak_rss_mib']:.0f} MiB", flush=True)
    hdr = (f"{'side':8} {'s/step':>7} {'rollout s':>9} {'update s':>8} {'steps/s':>7} {'compl len':>9} {'cpu%':>4} "
           f"{'oth%':>4} {'peak MiB':>8}  note")
    print(hdr + "\n" + "-" * len(hdr))
    for side, r in res.items():
        roll = statistics.median(r["rollout_s"])
        note = f"NOT VALID (cpu% {r['busy']:.0%}, others {r['others']:.0%})" if invalid(r) else ""
        print(f"{side:8} {r['sec']:7.2f} {roll:9.2f} {r['sec'] - roll:8.2f} {1 / r['sec']:7.3f} "
              f"{r['completion_length']:9.1f} {r['busy'] * 100:4.0f} {r['others'] * 100:4.0f} {r['peak_rss_mib']:8.0f}  {note}")
    for side, r in res.items():
        print(f"  {side}: {r['settings']}")
    for name in [n for n in res if n.startswith("trl")] if "lorakit" in res else []:
        lk, trl = res["lorakit"], res[name]
        speed = trl["sec"] / lk["sec"]
        roll = statistics.median(trl["rollout_s"]) / statistics.median(lk["rollout_s"])
        memory = lk["peak_rss_mib"] / trl["peak_rss_mib"]
        valid = not (invalid(lk) or invalid(trl))
        print(f"lorakit / {name}: steps/s {speed:.2f}x (rollout {roll:.2f}x faster), peak RSS {memory:.2f}x; target >= "
              f"{TARGET_SPEED:g}x steps/s at <= 1.0x memory: "
              + (("met" if speed >= TARGET_SPEED and memory <= 1.0 else "NOT met") if valid else "no verdict (rows not valid)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
