"""DPO training throughput and peak memory: lorakit's preference recipe against TRL's DPOTrainer + PEFT.

The same base model, the same preference pairs and the same LoRA settings go through
  lorakit  the real recipe: a run config (objective dpo) -> lorakit.recipes.run_recipe -> run_preference, which
           loads the base, wraps it (lora section), builds the Preference objective (reference = the base with
           adapters disabled) and calls lorakit.train.loop.fit
  trl      trl.DPOTrainer with a peft.LoraConfig (TRL wraps the model; the reference is the base with the adapter
           disabled) and a DPOConfig
each configuration in a fresh subprocess (bench/harness.py's allocator settings), and the script prints tokens/s,
peak RSS, cpu% and the lorakit / TRL ratios.

Setup (once, in a temp dir): a Llama-shaped model from a config with seeded random weights, saved in fp32 with a
word-level tokenizer whose vocabulary is the model's (t0, t1, ...; <pad> 0, <eos> 1), and seeded synthetic pairs
of random token ids: a `--prompt-len` prompt (256) with a chosen and a rejected completion of `--completion-len`
(256) tokens each, so every row is exactly 512 tokens and no batch pads. Both sides get these ids as they are:
lorakit as its PreferenceData (the recipe's data step is replaced by one that returns these pairs; nothing else
in the recipe is), TRL as a dataset of prompt_ids / chosen_ids / rejected_ids, the columns its own tokenization
produces (DPOTrainer._prepare_dataset, which would tokenize text, is replaced by the identity). Data preparation
is not timed on either side.

Both adapters start from the same NON-ZERO weights (bench/lora_step.py's fill_lora, seeded per layer, projection
and A/B): with a zero B the policy equals the reference and every DPO loss is ln 2, which checks nothing. Before
training each worker scores the same micro-batch (pairs 0 .. batch-1) with its side's own loss code (lorakit:
Preference.loss; TRL: DPOTrainer.compute_loss under the trainer's autocast), no gradient: the loss, the mean
summed log-probs of the chosen and rejected completions (policy) and the mean rewards (policy minus reference,
x beta) must agree up to bf16 rounding (the `check` table: every row against the other side's first row, within
CHECK_TOL_SIDES, and against its own side's first row, within CHECK_TOL_SAME; a DISAGREE there is a finding).

Settings on both sides: bf16 base (--dtype float32: an fp32 base, and TRL without autocast, for a CPU without bf16
units, where bf16 matmuls are emulated), LoRA r=16 alpha=32 dropout 0 on q,k,v,o (fp32 adapter weights, each side's
default), DPO sigmoid loss, beta 0.1, lr 1e-4 linear, no warmup, max_grad_norm 1.0, weight decay 0, batch 4 pairs
(8 rows) x 512 tokens, no gradient accumulation.

Configurations (--configs, or --sides to keep one side's):
  lk               lorakit defaults: speed.compile auto (compiles only runs of >= 300 steps on >= 20M parameters,
                   so a short benchmark run does not compile; the row's note says what auto decided),
                   adapter_compute auto, loss_chunk_tokens 1024, no gradient checkpointing
  lk-compile       speed.compile: on (what auto does for a real run of >= 300 steps; compiling happens in the
                   warm-up steps)
  lk-gc            lk + train.gradient_checkpointing
  lk-pre           lk + preference.reference.precompute: true
  lk-compile-pre   lk-compile + precompute
  trl-default      DPOConfig defaults: fp32 model with bf16=True (autocast), gradient checkpointing on
  trl-bf16         model loaded in bf16, bf16=True, gradient checkpointing off
  trl-amp          fp32 model, bf16=True autocast, gradient checkpointing off
  trl-bf16-gc      trl-bf16 with gradient checkpointing on
  trl-bf16-pre     trl-bf16 + precompute_ref_log_probs=True
  trl-amp-pre      trl-amp + precompute_ref_log_probs=True
With --dtype float32 the TRL configs that load bf16 are refused, and trl-amp / trl-default load fp32 with bf16=False
(so they are TRL's fp32 step without / with gradient checkpointing), lk runs model.dtype float32.
Every TRL config: use_cpu=True, report_to=[], save_strategy="no", seed 0, disable_tqdm; the rest TRL's defaults.
"best" on each side = its configuration with the highest tok/s among those run without precompute; the
precompute rows are compared with each other separately.

    python bench/preference_throughput.py --smoke                  # tiny model, 1 + 2 steps: checks the script
    python bench/preference_throughput.py                          # presets 40m and 150m, default configs
    python bench/preference_throughput.py --preset 150m --repeats 2
    python bench/preference_throughput.py --configs lk-pre,lk-compile-pre,trl-bf16-pre,trl-amp-pre
    python bench/preference_throughput.py --sides lorakit --preset 40m --steps 5

Timing: a step-end hook on each side (lorakit: fit's "step" hook; TRL: TrainerCallback.on_step_end) stamps the end
of every optimizer step, and the start of training (lorakit: fit is called; TRL: on_train_begin). A step's time is
from the previous stamp to its own: collation, the reference forward (unless precomputed), the policy forward and
backward, clipping, the optimizer step and each side's per-step logging. The first `--warmup` steps (compiling,
first-touch allocation) are left out; s/step is the median of the `--steps` timed steps (min-max beside it).
tok/s = tokens per step / median s/step, where tokens per step are the policy's rows (chosen + rejected, prompt +
completion: 2 x batch x 512), as each side counts them (lorakit: the step's `tokens`; TRL: the growth of its
num_tokens count, attention_mask.sum()), and checked equal. The reference forward over the same rows is work on
top of that and is not counted as tokens. pairs/s = batch / median.

Memory: peak RSS = the worker's whole-process peak (model loading included), the figure the other benchmarks
report (ru_maxrss); train peak = VmHWM after it is reset to the current RSS at the start of training
(/proc/self/clear_refs), read at the end: the training phase alone. The reset lowers ru_maxrss too, so peak RSS
is the larger of the peak before the reset (loading) and the training peak. Both MiB. torch.compile's compile
worker processes (lk-compile) are not counted: they are other processes and gone before the timed steps. The harness's allocator settings
keep freed memory in the process (right for timing; they raise both sides' peaks alike): --no-malloc-tune for a
memory-only run with glibc's defaults.

Columns: s/step median (min-max), tok/s, pairs/s, cpu% = process CPU time / (wall x threads) over the timed steps
(the side's own use of the cores), oth% = the CPU time every other process on the machine used in that window
(/proc/stat) / (wall x cores). A row is valid only with cpu% >= 90 and oth% <= 10; the script gives no target
verdict on invalid rows (oth% tells another process's contention from serial parts of a side's own step), prep s = model load + data + (for
-pre rows) precomputing the reference, up to the start of training, peak / train peak MiB, loss of step 1 / of
the last step (the samplers differ, so the steps see different pairs: these are not expected to agree; the check
table is).
"""
import argparse, json, os, resource, statistics, sys, tempfile, time

import harness
from memory_7b import proc_status, reset_peak  # VmHWM / VmRSS, and resetting VmHWM
from lora_step import LORA_RE, TARGETS, fill_lora
from train_speed import git_rev, machine

PRESETS = {
    "40m": dict(hidden=512, layers=8, heads=8, inter=1376, vocab=32000),
    "150m": dict(hidden=768, layers=12, heads=12, inter=2048, vocab=32000),
    "smoke": dict(hidden=64, layers=2, heads=4, inter=172, vocab=1024),
}
# name -> (side, options)
CONFIGS = {
    "lk": ("lorakit", dict(compile="auto")),
    "lk-compile": ("lorakit", dict(compile="on")),
    "lk-gc": ("lorakit", dict(compile="auto", gc=True)),
    "lk-pre": ("lorakit", dict(compile="auto", precompute=True)),
    "lk-compile-pre": ("lorakit", dict(compile="on", precompute=True)),
    "trl-default": ("trl", dict(load="fp32", gc=True)),
    "trl-bf16": ("trl", dict(load="bf16", gc=False)),
    "trl-amp": ("trl", dict(load="fp32", gc=False)),
    "trl-bf16-gc": ("trl", dict(load="bf16", gc=True)),
    "trl-bf16-pre": ("trl", dict(load="bf16", gc=False, precompute=True)),
    "trl-amp-pre": ("trl", dict(load="fp32", gc=False, precompute=True)),
}
DEFAULT_CONFIGS = "lk,trl-bf16,lk-compile,trl-amp,trl-default"  # interleaved sides
DEFAULT_CONFIGS_FP32 = "lk,trl-amp,lk-compile,trl-default"  # --dtype float32: no bf16 loads
# (label, lorakit config, TRL config): matched pairings printed beside best vs best
PAIRS = [("defaults", "lk", "trl-default"),
         ("no compile vs TRL bf16, no checkpointing", "lk", "trl-bf16"),
         ("no compile vs TRL autocast, no checkpointing", "lk", "trl-amp"),
         ("both with gradient checkpointing", "lk-gc", "trl-bf16-gc")]
TARGET_SPEED, TARGET_MEMORY = 1.5, 0.8
BETA = 0.1


# ----------------------------------------------------------------------------- setup (driver)
def build_setup(tmp: str, shape: dict, n_pairs: int, prompt_len: int, completion_len: int) -> tuple[str, str, int]:
    """Save the model + tokenizer and the pairs (JSON of token ids); returns (model_dir, pairs_path, params)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, shape["vocab"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    cfg = LlamaConfig(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                      intermediate_size=shape["inter"], vocab_size=shape["vocab"], max_position_embeddings=2048,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None, use_cache=False, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model_dir = os.path.join(tmp, "model")
    model.save_pretrained(model_dir)
    hf_tok.save_pretrained(model_dir)

    g = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(3, shape["vocab"], (n,), generator=g).tolist()

    pairs = []
    for _ in range(n_pairs):
        prompt, chosen, rejected = ids(prompt_len), ids(completion_len), ids(completion_len)
        while rejected == chosen:
            rejected = ids(completion_len)
        pairs.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    pairs_path = os.path.join(tmp, "pairs.json")
    with open(pairs_path, "w") as f:
        json.dump(pairs, f)
    return model_dir, pairs_path, sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- worker side
class Probe:
    """Stamps of the start of training and of each step's end; tokens per step; the training-phase peak."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.t_begin = time.perf_counter()
        self.stamps: dict[int, float] = {}  # step -> perf_counter at its end (0: start of training)
        self.rusage: dict[int, object] = {}
        self.machine_busy: dict[int, float] = {}  # step -> CPU seconds of the whole machine (/proc/stat)
        self.tokens: dict[int, int] = {}  # step -> tokens of that step
        self.losses: dict[int, float] = {}
        self.prep_s = self.rss_at_start = None
        self.load_peak, self.reset_ok = 0, False

    def begin(self) -> None:
        now = time.perf_counter()
        status = proc_status()
        self.prep_s, self.rss_at_start, self.load_peak = now - self.t_begin, status["VmRSS"], status["VmHWM"]
        self.reset_ok = reset_peak()
        self.stamps[0], self.rusage[0] = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        self.machine_busy[0] = machine_busy_seconds()

    def step(self, step: int, tokens: int | None = None, loss: float | None = None) -> None:
        self.stamps[step] = time.perf_counter()
        if step in (self.warmup, self.warmup + self.steps):
            self.rusage[step] = resource.getrusage(resource.RUSAGE_SELF)
            self.machine_busy[step] = machine_busy_seconds()
        if tokens is not None:
            self.tokens[step] = tokens
        if loss is not None:
            self.losses[step] = loss

    def result(self) -> dict:
        import torch
        last = self.warmup + self.steps
        missing = [s for s in range(self.warmup, last + 1) if s not in self.stamps]
        if missing:
            raise RuntimeError(f"no step-end stamp for steps {missing}")
        times = [self.stamps[s] - self.stamps[s - 1] for s in range(self.warmup + 1, last + 1)]
        r0, r1 = self.rusage[self.warmup], self.rusage[last]
        wall = self.stamps[last] - self.stamps[self.warmup]
        cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
        timed_tokens = sorted({self.tokens[s] for s in range(self.warmup + 1, last + 1) if s in self.tokens})
        losses = [self.losses[s] for s in sorted(self.losses)]
        end_hwm = proc_status()["VmHWM"]
        # ru_maxrss is the kernel's high-water mark, which the reset lowered too: the overall peak is the larger
        # of the peak before training (loading) and the training phase's.
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, self.load_peak, end_hwm)
        return dict(step_s=times, sec=statistics.median(times), spread=(min(times), max(times)),
                    warmup_s=[self.stamps[s] - self.stamps[s - 1] for s in range(1, self.warmup + 1)],
                    busy=cpu / (wall * torch.get_num_threads()), tokens_per_step=timed_tokens,
                    others=max(self.machine_busy[last] - self.machine_busy[self.warmup] - cpu, 0.0)
                    / (wall * (os.cpu_count() or 1)),
                    loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
                    prep_s=self.prep_s, rss_at_start_mib=self.rss_at_start / 2 ** 20,
                    peak_rss_mib=peak / 2 ** 20, load_peak_mib=self.load_peak / 2 ** 20,
                    train_peak_mib=end_hwm / 2 ** 20 if self.reset_ok else None)


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


OTHERS_MAX, BUSY_MIN = 0.10, 0.90
"""A row counts only when its own cpu% is at least 90 (the project's rule for a figure) and other processes used
at most 10% of the cores during its timed steps (oth%, which tells contention from a step's own serial parts)."""


def invalid(r: dict) -> bool:
    return r["others"] > OTHERS_MAX or r["busy"] < BUSY_MIN


def lora_params(model) -> dict:
    """{(layer, proj, A|B, adapter): parameter} of the trainable LoRA weights (lorakit or PEFT names)."""
    out = {}
    for n, p in model.named_parameters():
        m = LORA_RE.search(n) if ".lora_" in n else None
        if m and p.requires_grad:
            out[(int(m[1]), m[2], m[3], m[4])] = p
    return out


def load_pairs(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)


def lorakit_worker(args, opts: dict, probe: Probe) -> dict:
    import torch
    import lorakit.recipes.preference as recipe
    from lorakit.config import run_config_from_dict
    from lorakit.data.prepare import DataSummary
    from lorakit.data.preference import PreferenceData, PreferencePair, collate_preference
    from lorakit.recipes import run_recipe

    pairs = load_pairs(args.pairs)
    out_dir = os.path.join(args.tmp, f"out-{args.config}")
    cfg = {"model": {"name_or_path": args.model_dir, "dtype": args.dtype},
           "objective": "dpo",
           "lora": {"r": args.r, "lora_alpha": args.alpha, "lora_dropout": 0.0, "target_modules": TARGETS},
           "data": {"train": args.pairs, "max_seq_len": args.prompt_len + args.completion_len},
           "train": {"max_steps": args.warmup + args.steps, "batch_size": args.batch, "lr": args.lr,
                     "lr_schedule": "linear", "log_every": 1,
                     **({"gradient_checkpointing": True} if opts.get("gc") else {})},
           "speed": {"compile": opts["compile"]},
           "preference": {"beta": BETA, "reference": {"precompute": bool(opts.get("precompute"))}},
           "output_dir": out_dir}
    seen, lines = {}, []

    def data(config, tokenizer, log):  # replaces the recipe's _data: these token ids, as prepare_preference keeps them
        summary = DataSummary(source=args.pairs, format="preference", records_read=len(pairs), kept=len(pairs))
        examples = [PreferencePair(p["prompt_ids"], p["chosen_ids"], p["rejected_ids"], f"{args.pairs}:{i + 1}")
                    for i, p in enumerate(pairs)]
        return PreferenceData(examples, summary, tokenizer.pad_token_id), None

    real_fit = recipe.fit

    def fit(model, objective, config, output_dir, **kw):  # instrumentation: same init, the check, step stamps
        params = lora_params(model)
        assert len(params) == args.layers * len(TARGETS) * 2, len(params)
        fill_lora(params)
        seen["lora_dtype"] = str(next(iter(params.values())).dtype).removeprefix("torch.")
        seen["base_dtype"] = str(next(p for p in model.parameters() if not p.requires_grad).dtype).removeprefix("torch.")
        batch = collate_preference(objective.data, list(range(args.batch)))
        with torch.no_grad():
            scored = objective.loss(model, batch, objective.normaliser([batch]))
        n = scored.sums["examples"]
        seen["check"] = dict(loss=float(scored.term), chosen_logps=scored.sums["chosen_logps"] / n,
                             rejected_logps=scored.sums["rejected_logps"] / n,
                             chosen_rewards=scored.sums["chosen_rewards"] / n,
                             rejected_rewards=scored.sums["rejected_rewards"] / n)
        seen["precomputed"] = bool(objective.precomputed)

        def hook(event, info):
            if event == "step":
                probe.step(info["step"], tokens=int(info["tokens"]), loss=float(info["loss"]))

        kw["hooks"] = [*kw.get("hooks", ()), hook]
        probe.begin()
        return real_fit(model, objective, config, output_dir, **kw)

    def log(line: str) -> None:
        lines.append(line)
        if args.verbose:
            print(line, file=sys.stderr)

    assert hasattr(recipe, "_data") and hasattr(recipe, "fit"), "lorakit.recipes.preference changed: update the bench"
    recipe._data, recipe.fit = data, fit
    run_recipe(run_config_from_dict(cfg), overwrite=True, log=log)
    notes = [l for l in lines if l.startswith("speed:")]
    settings = (f"run config {json.dumps({k: cfg[k] for k in ('model', 'train', 'speed', 'preference')}, separators=(',', ':'))}; "
                f"base {seen['base_dtype']}, LoRA {seen['lora_dtype']}; reference precomputed: {seen['precomputed']}")
    return dict(check=seen["check"], settings=settings, notes=notes)


def trl_worker(args, opts: dict, probe: Probe) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer whose dataset already holds prompt_ids / chosen_ids / rejected_ids (its tokenize_fn's output);
        only the text preparation is skipped, training is DPOTrainer's."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    class Stamps(TrainerCallback):
        def __init__(self):
            self.trainer, self.counted = None, 0

        def on_train_begin(self, targs, state, control, **kw):
            self.counted = self.trainer._total_train_tokens
            probe.begin()

        def on_step_end(self, targs, state, control, **kw):
            total = self.trainer._total_train_tokens  # attention_mask.sum() of the policy rows, as TRL counts
            probe.step(state.global_step, tokens=total - self.counted)
            self.counted = total

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    load = torch.bfloat16 if opts["load"] == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=load)
    ds = Dataset.from_list(load_pairs(args.pairs))
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=args.r, lora_alpha=args.alpha, lora_dropout=0.0,
                             target_modules=TARGETS)
    kw = dict(output_dir=os.path.join(args.tmp, f"out-{args.config}"), per_device_train_batch_size=args.batch,
              max_steps=args.warmup + args.steps, learning_rate=args.lr, lr_scheduler_type="linear", beta=BETA,
              loss_type=["sigmoid"], bf16=args.dtype == "bfloat16", use_cpu=True, report_to=[], save_strategy="no", seed=0,
              disable_tqdm=True, activation_checkpointing=bool(opts["gc"]),
              precompute_ref_log_probs=bool(opts.get("precompute")))
    targs = DPOConfig(**kw)
    stamps = Stamps()
    trainer = PretokenizedDPOTrainer(model=model, args=targs, train_dataset=ds, processing_class=tok,
                                     peft_config=peft_config, callbacks=[stamps])
    stamps.trainer = trainer
    params = lora_params(trainer.model)
    assert len(params) == args.layers * len(TARGETS) * 2, len(params)
    fill_lora(params)  # after __init__: a precomputed reference (the base, adapter disabled) does not depend on it

    # the check: the same micro-batch through DPOTrainer.compute_loss, under the trainer's autocast
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(args.batch)])
    mode = "train" if trainer.model.training else "eval"
    tokens_before = trainer._total_train_tokens
    with torch.no_grad(), trainer.accelerator.autocast():
        loss = float(trainer.compute_loss(trainer.model, batch))
    m = trainer._metrics[mode]
    check = dict(loss=loss, chosen_logps=m["logps/chosen"][-1], rejected_logps=m["logps/rejected"][-1],
                 chosen_rewards=m["rewards/chosen"][-1],
                 rejected_rewards=m["rewards/rejected"][-1])
    trainer._metrics[mode].clear()
    trainer._total_train_tokens = tokens_before

    losses = []
    real_compute_loss = trainer.compute_loss

    def compute_loss(*a, **k):  # record each training micro-batch's loss (TRL logs only every logging_steps)
        out = real_compute_loss(*a, **k)
        losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
        return out

    trainer.compute_loss = compute_loss
    trainer.train()
    for i, value in enumerate(losses[: args.warmup + args.steps]):
        probe.losses[i + 1] = value
    lora_dtype = str(next(iter(params.values())).dtype).removeprefix("torch.")
    shown = {k: v for k, v in kw.items() if k != "output_dir"}
    settings = (f"DPOConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())}); model loaded "
                f"{str(load).removeprefix('torch.')}, LoRA {lora_dtype}; optim {targs.optim}; "
                f"activation_checkpointing={targs.activation_checkpointing}")
    return dict(check=check, settings=settings, notes=[])


def worker(args):
    import torch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    side, opts = CONFIGS[args.config]
    args.layers = PRESETS[args.preset]["layers"]
    probe = Probe(args.warmup, args.steps)
    out = (lorakit_worker if side == "lorakit" else trl_worker)(args, opts, probe)
    out.update(probe.result(), side=side, config=args.config, threads=torch.get_num_threads(),
               jemalloc_loaded="libjemalloc" in open("/proc/self/maps").read())
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- driver side
def run_worker(args, config: str, preset: str, model_dir: str, pairs: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", config, "--preset", preset, "--model-dir", model_dir,
           "--pairs", pairs, "--tmp", args.tmp, "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--threads", str(args.threads), "--r", str(args.r), "--alpha", str(args.alpha), "--lr", str(args.lr),
           "--batch", str(args.batch), "--prompt-len", str(args.prompt_len),
           "--completion-len", str(args.completion_len), "--dtype", args.dtype] + (["--verbose"] if args.verbose else [])
    return harness.run_worker(cmd, f"{preset}/{config}", malloc_tune=not args.no_malloc_tune,
                              extra_env={"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                                         "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


# check tolerances: (loss, chosen log-prob relative, rewards); across sides bf16 rounding differs (TRL autocasts the
# LoRA matmuls, lorakit's check runs before its speed setup), within a side the numbers should repeat
CHECK_TOL_SIDES = (2e-2, 1e-2, 5e-2)
CHECK_TOL_SAME = (1e-3, 1e-4, 2e-3)


def agreement(a: dict, b: dict, name: str, tol: tuple) -> str:
    """One row of the check against another: the largest differences and whether they are within `tol`."""
    d_loss = abs(a["loss"] - b["loss"])
    rel = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-9) for k in ("chosen_logps", "rejected_logps"))
    d_rw = max(abs(a["chosen_rewards"] - b["chosen_rewards"]), abs(a["rejected_rewards"] - b["rejected_rewards"]))
    ok = d_loss <= tol[0] and rel <= tol[1] and d_rw <= tol[2]
    return (f"vs {name}: |dloss| {d_loss:.1e}, logp {rel:.1e} rel, |d reward| {d_rw:.1e} "
            + ("ok" if ok else "DISAGREE"))


def fmt_mib(x) -> str:
    return f"{x:.0f}" if x is not None else "-"


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def report(preset: str, res: dict, args) -> None:
    """The per-config table, the agreement check and the lorakit / TRL ratios of one preset."""
    tokens = 2 * args.batch * (args.prompt_len + args.completion_len)
    hdr = (f"{'config':15} {'side':7} {'s/step':>7} {'min-max s':>11} {'tok/s':>8} {'pairs/s':>7} {'cpu%':>4} {'oth%':>4} "
           f"{'prep s':>6} {'peak MiB':>8} {'train pk':>8} {'loss 1st':>9} {'loss last':>9}  note")
    print(hdr + "\n" + "-" * len(hdr))
    for name, r in res.items():
        notes = list(r.get("notes", []))
        if invalid(r):
            notes.insert(0, f"NOT VALID (cpu% {r['busy']:.0%}, other processes {r['others']:.0%} of the cores)")
        if r["tokens_per_step"] != [tokens]:
            notes.insert(0, f"TOKENS PER STEP {r['tokens_per_step']} != {tokens}")
        lo, hi = r["spread"]
        lf = f"{r['loss_first']:9.4f}" if r["loss_first"] is not None else f"{'-':>9}"
        ll = f"{r['loss_last']:9.4f}" if r["loss_last"] is not None else f"{'-':>9}"
        print(f"{name:15} {r['side']:7} {r['sec']:7.3f} {f'{lo:.2f}-{hi:.2f}':>11} {r['tok_s']:8.1f} "
              f"{args.batch / r['sec']:7.2f} {r['busy'] * 100:4.0f} {r['others'] * 100:4.0f} {r['prep_s']:6.1f} {fmt_mib(r['peak_rss_mib']):>8} "
              f"{fmt_mib(r['train_peak_mib']):>8} {lf} {ll}  {'; '.join(notes)}")
    print("settings:")
    for name, r in res.items():
        print(f"  {name}: {r['settings']}")

    print(f"check: pairs 0-{args.batch - 1} scored before training by each side's own loss code (no gradient); each "
          f"row against the other side's first row (and, for later rows, its own side's first row)")
    print(f"  {'config':15} {'loss':>9} {'chosen logp':>12} {'rejected logp':>13} {'chosen reward':>13} "
          f"{'rejected reward':>15}  agreement")
    first = {side: next((n for n in res if res[n]["side"] == side), None) for side in ("lorakit", "trl")}
    for name, r in res.items():
        c, verdicts = r["check"], []
        other = first["trl" if r["side"] == "lorakit" else "lorakit"]
        if other is not None:
            verdicts.append(agreement(c, res[other]["check"], other, CHECK_TOL_SIDES))
        own = first[r["side"]]
        if own != name:
            verdicts.append(agreement(c, res[own]["check"], own, CHECK_TOL_SAME))
        print(f"  {name:15} {c['loss']:9.5f} {c['chosen_logps']:12.3f} {c['rejected_logps']:13.3f} {c['chosen_rewards']:13.5f} "
              f"{c['rejected_rewards']:15.5f}  {'; '.join(verdicts)}")

    def best(side: str, pre: bool):
        names = [n for n in res if res[n]["side"] == side and CONFIGS[n][1].get("precompute", False) == pre]
        return max(names, key=lambda n: res[n]["tok_s"]) if names else None

    print(f"\nratios lorakit / TRL ({preset})")
    lines = []
    for pre in (False, True):
        k, t = best("lorakit", pre), best("trl", pre)
        if k and t:
            lines.append((f"best vs best{' (precompute both)' if pre else ''}", k, t))
    fp32 = args.dtype == "float32"  # trl-amp is then TRL's plain fp32 step
    lines += [(label.replace("TRL autocast", "TRL fp32") if fp32 else label, k, t) for label, k, t in PAIRS
              if k in res and t in res]
    for label, k, t in lines:
        a, b = res[k], res[t]
        valid = "  NOT VALID (cpu% < 90 or contended)" if invalid(a) or invalid(b) else ""
        print(f"  {label:46} {k:>14} / {t:13} tok/s {a['tok_s'] / b['tok_s']:5.2f}x   peak RSS "
              f"{ratio(a['peak_rss_mib'], b['peak_rss_mib']):>6}   train peak "
              f"{ratio(a['train_peak_mib'], b['train_peak_mib']):>6}{valid}")
    k, t = best("lorakit", False), best("trl", False)
    if k and t:
        a, b = res[k], res[t]
        speed, mem = a["tok_s"] / b["tok_s"], a["peak_rss_mib"] / b["peak_rss_mib"]
        valid = not (invalid(a) or invalid(b))
        if preset == "smoke":
            print("  target: no verdict on the smoke shape (the issue's target is for 40m and 150m)")
            return
        print(f"  target (>= {TARGET_SPEED}x tok/s, <= {TARGET_MEMORY}x peak RSS), best vs best: tok/s {speed:.2f}x "
              f"{'met' if speed >= TARGET_SPEED else 'NOT met'}, peak RSS {mem:.2f}x "
              f"{'met' if mem <= TARGET_MEMORY else 'NOT met'}"
              + ("" if valid else "  (invalid rows: no verdict)"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="40m,150m", help="comma-separated, of: 40m, 150m")
    ap.add_argument("--configs", default=None, help=f"comma-separated, of: {', '.join(CONFIGS)} (default: "
                    f"{DEFAULT_CONFIGS}; --dtype float32: {DEFAULT_CONFIGS_FP32})")
    ap.add_argument("--sides", default="lorakit,trl", help="keep only these sides' configs: lorakit, trl or both")
    ap.add_argument("--warmup", type=int, default=None,
                    help="optimizer steps left out of the timing (compiling); default 2 (--smoke: 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps (median reported); default 8 (--smoke: 2)")
    ap.add_argument("--repeats", type=int, default=1, help="fresh workers per config, interleaved; best tok/s kept")
    ap.add_argument("--batch", type=int, default=4, help="pairs per micro-batch (2x rows)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--completion-len", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="the base's dtype on both sides (float32: for a CPU without bf16 units; TRL without autocast)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in every worker; 0 = torch default")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model (hidden 64, 2 layers, vocab 1024), 2 pairs x (32 + 32) tokens, 1 + 2 steps")
    ap.add_argument("--no-malloc-tune", action="store_true", help="don't set GLIBC_TUNABLES / MALLOC_CONF for the workers")
    ap.add_argument("--verbose", action="store_true", help="workers print their training log to stderr")
    ap.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    for hidden in ("--model-dir", "--pairs", "--tmp"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.config = args.worker
        return worker(args)

    if args.smoke:
        args.preset, args.batch, args.prompt_len, args.completion_len = "smoke", 2, 32, 32
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    args.steps = args.steps if args.steps is not None else (2 if args.smoke else 8)
    presets = [p.strip() for p in args.preset.split(",") if p.strip()]
    bad = [p for p in presets if p not in PRESETS]
    if bad:
        ap.error(f"unknown preset {bad}; choose from 40m, 150m (or --smoke)")
    sides = {s.strip() for s in args.sides.split(",") if s.strip()}
    if not sides or sides - {"lorakit", "trl"}:
        ap.error("--sides: lorakit, trl or lorakit,trl")
    args.configs = args.configs or (DEFAULT_CONFIGS if args.dtype == "bfloat16" else DEFAULT_CONFIGS_FP32)
    configs = [c for c in harness.chosen_configs(args.configs, CONFIGS) if CONFIGS[c][0] in sides]
    if not configs:
        ap.error("no configuration left after --sides")
    bf16_only = [c for c in configs if CONFIGS[c][1].get("load") == "bf16"]
    if args.dtype == "float32" and bf16_only:
        ap.error(f"--dtype float32: {', '.join(bf16_only)} load the model in bf16; use lk*, trl-amp*, trl-default")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        ap.error("--steps and --repeats must be >= 1, --warmup >= 0")

    import torch
    from importlib.metadata import version
    print(f"machine: {machine()}  loadavg {os.getloadavg()[0]:.2f}")
    print(f"versions: torch {torch.__version__}  transformers {version('transformers')}  peft {version('peft')}  "
          f"trl {version('trl')}  datasets {version('datasets')}  accelerate {version('accelerate')}  "
          f"lorakit {version('lorakit')} (git {git_rev()})")
    print("allocator: " + harness.malloc_line(not args.no_malloc_tune))
    row = args.prompt_len + args.completion_len
    print(f"settings: batch {args.batch} pairs = {2 * args.batch} rows x {row} tokens ({args.prompt_len} prompt + "
          f"{args.completion_len} completion, random ids, no padding) = {2 * args.batch * row} tokens/step; LoRA "
          f"r={args.r} alpha={args.alpha} dropout 0 on {','.join(TARGETS)}, same non-zero init on both sides; DPO "
          f"sigmoid, beta {BETA}, lr {args.lr:g} linear; {args.dtype} base; {args.warmup} warm-up + {args.steps} timed steps "
          f"(median); {args.repeats} repeat(s), configs interleaved")
    n_pairs = args.batch * (args.warmup + args.steps)  # one epoch: no sampler wraps around
    for preset in presets:
        shape = PRESETS[preset]
        with tempfile.TemporaryDirectory() as tmp:
            args.tmp = tmp
            model_dir, pairs, n_params = build_setup(tmp, shape, n_pairs, args.prompt_len, args.completion_len)
            print(f"\n== preset {preset}: {shape} = {n_params / 1e6:.1f}M parameters (fp32 on disk); {n_pairs} pairs",
                  flush=True)
            res: dict = {}
            for rep in range(args.repeats):
                for config in configs:
                    t0 = time.perf_counter()
                    r = run_worker(args, config, preset, model_dir, pairs)
                    r["tok_s"] = r["tokens_per_step"][0] / r["sec"] if r["tokens_per_step"] else 0.0
                    steps = " ".join(f"{x:.2f}" for x in r["warmup_s"]) + " | " + " ".join(f"{x:.2f}" for x in r["step_s"])
                    print(f"  ran {config} (repeat {rep + 1}): {r['sec']:.3f} s/step, {r['tok_s']:.1f} tok/s, cpu "
                          f"{r['busy'] * 100:.0f}%, others {r['others'] * 100:.0f}%, peak {r['peak_rss_mib']:.0f} MiB; worker {time.perf_counter() - t0:.0f} s; "
                          f"step s (warm-up | timed) {steps}", flush=True)
                    if config not in res or r["tok_s"] > res[config]["tok_s"]:
                        res[config] = r
            report(preset, res, args)


if __name__ == "__main__":
    main()
