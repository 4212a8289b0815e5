"""Training throughput of the lorakit workflow against PEFT + the Hugging Face `Trainer`.

The same base model, data and LoRA settings go through
  lorakit  the real workflow: a run YAML -> lorakit.config.load_run_config -> lorakit.recipes.sft.run_training
  peft     transformers.Trainer + TrainingArguments with peft.get_peft_model
each configuration in a fresh subprocess (same allocator settings as bench/lora_step.py), and the script
prints tokens/s, peak RSS, cpu% busy and the lorakit/PEFT ratio of each pairing.

Setup (once, in a temp dir): a Llama-shaped model from a config with seeded random weights, saved in fp32
with a byte-level BPE tokenizer trained on the synthetic corpus (vocab 8000, chatml chat template, a
dedicated <pad> token), and a seeded synthetic chat dataset in JSONL (`messages`, 1-2 exchanges, about
40-510 tokens per record). Both sides tokenize with lorakit's data preparation (the same chatml template,
loss only on the assistant turns: labels -100 on the prompt), so both get identical token ids and labels.

Timing: the wall time from the end of optimizer step `warmup` to the end of step `warmup + steps`, taken
from a step-end hook on each side (lorakit: its per-step log line; Trainer: a TrainerCallback.on_step_end),
so it covers batch collation, forward, backward, clipping and the optimizer step on both sides and excludes
model loading, data preparation and the final save. tokens/s = real (non-pad) input tokens of the timed
steps, counted by a forward pre-hook on the model (input_ids != <pad>), over that time. The samplers
differ (both draw random batches by default, from different random streams; pf-best groups by length), so
the steps see different examples; the `tokens` column gives each side's count.

Configurations (--configs):
  lk-default    lorakit defaults: model.dtype auto (bf16 on CPUs with AMX/AVX-512-BF16), random batches
                (length-grouped until issue 15, see bench/quality.py), no packing (the default for chat
                data), no gradient checkpointing
  lk-fp32       as lk-default with model.dtype float32 (matched against PEFT's fp32 defaults)
  lk-best       lk-default + data.packing: true
  lk-best-gc    lk-best + train.gradient_checkpointing: true
  pf-default    Trainer defaults: fp32 model, no mixed precision, random sampler, DataCollatorForSeq2Seq
  pf-best       model loaded in bf16, bf16=True, train_sampling_strategy=group_by_length (no packing: the
                Trainer has none without TRL)
  pf-best-amp   fp32 model with bf16=True autocast, group_by_length (the other way to run bf16 on Trainer)
  pf-best-gc    pf-best + activation (gradient) checkpointing

    python bench/train_throughput.py --quick            # smoke test, ~1-2 min (mostly imports)
    python bench/train_throughput.py                    # --preset small (hidden 512, 8 layers, 33.5M), ~1.5 min idle on 2 cores
    python bench/train_throughput.py --preset 150m      # hidden 768, 12 layers, vocab 32000

Columns: tok/s over the timed steps; s/step = timed wall / steps; tokens = real tokens in the timed steps;
cpu% = process CPU time / (wall * threads) over the timed steps (well below ~90: another process competed for
the cores, rerun); rss = the worker's peak RSS (ru_maxrss, model loading included); loss first/last = train
loss of step 1 and of the last step.
"""
import argparse, json, os, random, resource, sys, tempfile, time

import harness

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PRESETS = {
    "small": dict(hidden=512, layers=8, heads=8, inter=1376, vocab=8000),
    "150m": dict(hidden=768, layers=12, heads=12, inter=2048, vocab=32000),
    "quick": dict(hidden=256, layers=4, heads=4, inter=688, vocab=8000),
}
TOKENIZER_VOCAB = 8000
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CHATML_JINJA = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONFIGS = {
    "lk-default": ("lorakit", {}),
    "lk-fp32": ("lorakit", {"dtype": "float32"}),
    "lk-best": ("lorakit", {"packing": True}),
    "lk-best-gc": ("lorakit", {"packing": True, "gc": True}),
    "pf-default": ("peft", {}),
    "pf-best": ("peft", {"load": "bf16", "bf16": True, "group": True}),
    "pf-best-amp": ("peft", {"bf16": True, "group": True}),
    "pf-best-gc": ("peft", {"load": "bf16", "bf16": True, "group": True, "gc": True}),
}
# (label, lorakit config, peft config): the ratios printed at the end.
PAIRS = [("defaults (target >= 2x)", "lk-default", "pf-default"),
         ("matched fp32, no packing", "lk-fp32", "pf-default"),
         ("matched bf16, no packing", "lk-default", "pf-best"),
         ("matched bf16, no packing (Trainer autocast)", "lk-default", "pf-best-amp"),
         ("best vs best", "lk-best", "pf-best"),
         ("best + grad ckpt", "lk-best-gc", "pf-best-gc")]
DEFAULT_CONFIGS = "lk-default,lk-fp32,lk-best,pf-default,pf-best"


# ----------------------------------------------------------------------------- setup (driver)
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ven", "dor", "al", "is", "um", "tre", "qua", "zen",
             "ber", "fi", "go", "ha", "ju", "ly", "mo", "nu", "ox", "pri", "sa", "ti", "ur", "wi"]


def synthetic_records(n: int, seed: int) -> list[dict]:
    """Seeded chat records: a system line sometimes, 1-2 user/assistant exchanges, varied lengths."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    vocab += ["the", "a", "is", "of", "and", "to", "in", "it", "you", "what", "how", "why", "please"]

    def sentence(lo: int, hi: int) -> str:
        words = [rng.choice(vocab) for _ in range(rng.randint(lo, hi))]
        text, out = "", []
        for i, w in enumerate(words):
            out.append(w.capitalize() if i == 0 or out[-1].endswith(".") else w)
            if rng.random() < 0.1:
                out[-1] += rng.choice([".", ",", "?", "!"])
        return " ".join(out) + rng.choice([".", "?", "!"])

    records = []
    for _ in range(n):
        msgs = [{"role": "system", "content": sentence(4, 15)}] if rng.random() < 0.3 else []
        for _ in range(1 if rng.random() < 0.7 else 2):
            msgs.append({"role": "user", "content": sentence(5, 60)})
            msgs.append({"role": "assistant", "content": sentence(10, 160)})
        records.append({"messages": msgs})
    return records


def build_setup(tmp: str, shape: dict, n_records: int) -> tuple[str, str, int, int]:
    """Save the model + tokenizer and the JSONL dataset; returns (model_dir, data_path, tokenizer size, params)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    records = synthetic_records(n_records, seed=0)
    data_path = os.path.join(tmp, "train.jsonl")
    with open(data_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((m["content"] for r in records for m in r["messages"]), trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                     bos_token=None, additional_special_tokens=SPECIAL[1:])
    hf_tok.chat_template = CHATML_JINJA
    assert len(hf_tok) <= shape["vocab"], (len(hf_tok), shape["vocab"])
    cfg = LlamaConfig(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                      intermediate_size=shape["inter"], vocab_size=shape["vocab"], max_position_embeddings=2048,
                      pad_token_id=hf_tok.pad_token_id, eos_token_id=hf_tok.eos_token_id, bos_token_id=None,
                      use_cache=False, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model_dir = os.path.join(tmp, "model")
    model.save_pretrained(model_dir)
    hf_tok.save_pretrained(model_dir)
    return model_dir, data_path, len(hf_tok), sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- worker side
class Probe:
    """Step-end timestamps, rusage and real-token counts; `mark(step)` is called at the end of each step."""

    def __init__(self, warmup: int, steps: int, pad_id: int):
        self.warmup, self.steps, self.pad_id = warmup, steps, pad_id
        self.tokens = 0  # real input tokens of all forwards so far
        self.start = self.end = None

    def pre_hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.tokens += int((ids != self.pad_id).sum())

    def mark(self, step: int) -> None:
        if step == self.warmup:
            self.start = (time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF), self.tokens)
        elif step == self.warmup + self.steps:
            self.end = (time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF), self.tokens)

    def result(self) -> dict:
        import torch
        (t0, r0, k0), (t1, r1, k1) = self.start, self.end
        wall = t1 - t0
        cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
        return dict(wall=wall, tokens=k1 - k0, tok_s=(k1 - k0) / wall, s_step=wall / self.steps,
                    busy=cpu / (wall * torch.get_num_threads()))


def lorakit_worker(args, opts: dict, probe: Probe) -> dict:
    import yaml
    import lorakit.recipes.sft as run_mod
    from lorakit.config import load_run_config

    out_dir = os.path.join(args.tmp, f"out-{args.config}")
    cfg = {"model": {"name_or_path": args.model_dir, **({"dtype": opts["dtype"]} if "dtype" in opts else {})},
           "lora": {"r": args.r, "lora_alpha": args.alpha, "lora_dropout": 0.0, "target_modules": TARGETS},
           "data": {"train": args.data, "max_seq_len": args.max_seq_len,
                    **({"packing": True} if opts.get("packing") else {})},
           "train": {"max_steps": args.warmup + args.steps, "batch_size": args.batch,
                     **({"gradient_checkpointing": True} if opts.get("gc") else {})},
           "output_dir": out_dir}
    path = os.path.join(args.tmp, f"run-{args.config}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    real_fit, seen = run_mod.fit, {}

    def fit(model, train, *a, **kw):  # instrumentation only: count real tokens at the input embeddings
        # (not at the model's forward: the chunked loss runs the decoder alone, and that hook saw no tokens)
        model.model.get_input_embeddings().register_forward_pre_hook(probe.pre_hook, with_kwargs=True)
        seen["packing"], seen["dtype"] = train.data.packing, str(next(model.parameters()).dtype)  # train: the objective
        return real_fit(model, train, *a, **kw)

    def log(line: str) -> None:
        if line.startswith("step "):  # "step n/total | ..." is logged at the end of each optimizer step
            probe.mark(int(line.split()[1].split("/")[0]))
        elif args.verbose:
            print(line, file=sys.stderr)

    run_mod.fit = fit
    result = run_mod.run_training(load_run_config(path), overwrite=True, log=log)  # repeats reuse out_dir
    settings = (f"yaml {json.dumps({k: cfg[k] for k in ('model', 'data', 'train')}, separators=(',', ':'))}; "
                f"packing={seen['packing']}")
    return dict(loss_first=result.losses[0], loss_last=result.losses[-1], settings=settings)


def peft_worker(args, opts: dict, probe: Probe) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)
    from lorakit.data import DataOptions, prepare

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    load = torch.bfloat16 if opts.get("load") == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=load)
    # identical token ids and prompt masks to lorakit's (same template and masking code)
    data = prepare(args.data, tok, DataOptions(max_seq_len=args.max_seq_len, packing=False))
    ds = Dataset.from_dict({"input_ids": [e.input_ids for e in data.examples],
                            "labels": [e.labels for e in data.examples]})
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=args.r, lora_alpha=args.alpha,
                                             lora_dropout=0.0, target_modules=TARGETS))
    losses = []
    model.register_forward_pre_hook(probe.pre_hook, with_kwargs=True)
    model.register_forward_hook(lambda m, a, out: losses.append(float(out.loss.detach())))

    class StepEnd(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            probe.mark(state.global_step)

    kw = dict(output_dir=os.path.join(args.tmp, f"out-{args.config}"), per_device_train_batch_size=args.batch,
              max_steps=args.warmup + args.steps, report_to="none", save_strategy="no", use_cpu=True, seed=0,
              disable_tqdm=True)
    if opts.get("bf16"):
        kw["bf16"] = True
    if opts.get("group"):
        kw["train_sampling_strategy"] = "group_by_length"
    if opts.get("gc"):
        kw["activation_checkpointing"] = True
        kw["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    targs = TrainingArguments(**kw)
    trainer = Trainer(model=model, args=targs, train_dataset=ds, callbacks=[StepEnd()],
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True))
    trainer.train()
    lora_dtype = next(p.dtype for n, p in model.named_parameters() if "lora_A" in n)
    settings = (f"TrainingArguments({', '.join(f'{k}={v!r}' for k, v in kw.items() if k != 'output_dir')}); "
                f"model loaded {str(load).removeprefix('torch.')}, LoRA {str(lora_dtype).removeprefix('torch.')}; "
                f"optim {targs.optim}; DataCollatorForSeq2Seq(padding=True)")
    return dict(loss_first=losses[0], loss_last=losses[-1], settings=settings)


def worker(args):
    import torch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    side, opts = CONFIGS[args.config]
    probe = Probe(args.warmup, args.steps, args.pad_id)
    out = (lorakit_worker if side == "lorakit" else peft_worker)(args, opts, probe)
    out.update(probe.result(), side=side, config=args.config, threads=torch.get_num_threads(),
               peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               jemalloc_loaded="libjemalloc" in open("/proc/self/maps").read())
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- driver side
# Allocator settings and the fresh-process runner: see harness.py.


def run_worker(args, config: str, model_dir: str, data: str, pad_id: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", config, "--model-dir", model_dir, "--data", data,
           "--tmp", args.tmp, "--pad-id", str(pad_id), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--threads", str(args.threads), "--r", str(args.r), "--alpha", str(args.alpha),
           "--batch", str(args.batch), "--max-seq-len", str(args.max_seq_len)]
    return harness.run_worker(cmd, config, malloc_tune=not args.no_malloc_tune,
                              extra_env={"TOKENIZERS_PARALLELISM": "false"})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["small", "150m"], default="small")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--records", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch default")
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 warm-up + 3 timed steps: a smoke test")
    ap.add_argument("--no-malloc-tune", action="store_true", help="don't set GLIBC_TUNABLES / MALLOC_CONF for the workers")
    ap.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    for hidden in ("--model-dir", "--data", "--tmp"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--pad-id", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.config = args.worker
        return worker(args)

    configs = harness.chosen_configs(args.configs, CONFIGS)
    if args.quick:
        args.warmup, args.steps, args.records = 1, 3, min(args.records, 64)
    shape = PRESETS["quick" if args.quick else args.preset]

    print(harness.environment_line(args.threads))
    print(harness.malloc_line(not args.no_malloc_tune))
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        model_dir, data, n_vocab, n_params = build_setup(tmp, shape, args.records)
        from transformers import AutoTokenizer
        from lorakit.data import DataOptions, prepare
        tok = AutoTokenizer.from_pretrained(model_dir)
        lengths = sorted(len(e.input_ids) for e in prepare(data, tok, DataOptions(max_seq_len=args.max_seq_len)).examples)
        print(f"model {'quick' if args.quick else args.preset} {shape} = {n_params / 1e6:.1f}M params (fp32 on disk); "
              f"tokenizer byte-level BPE, {n_vocab} tokens (model vocab {shape['vocab']})")
        print(f"data {args.records} chat records, {len(lengths)} examples, tokens/example min {lengths[0]} "
              f"median {lengths[len(lengths) // 2]} max {lengths[-1]} (max_seq_len {args.max_seq_len}); "
              f"LoRA r={args.r} alpha={args.alpha} dropout=0 on {','.join(TARGETS)}; batch {args.batch}; "
              f"{args.warmup} warm-up + {args.steps} timed optimizer steps")
        print("Trainer has no packing without TRL: pf-* configs never pack (each row is one padded example).")
        results = {}
        hdr = (f"{'config':12} {'side':7} {'tok/s':>8} {'s/step':>7} {'tokens':>7} {'cpu%':>4} {'rss MiB':>8} "
               f"{'loss first':>10} {'loss last':>9}  settings")
        print(hdr + "\n" + "-" * len(hdr), flush=True)
        for config in configs:
            r = results[config] = run_worker(args, config, model_dir, data, tok.pad_token_id)
            print(f"{config:12} {r['side']:7} {r['tok_s']:8.1f} {r['s_step']:7.2f} {r['tokens']:7d} "
                  f"{r['busy'] * 100:4.0f} {r['peak_rss_mib']:8.0f} {r['loss_first']:10.4f} {r['loss_last']:9.4f}  "
                  f"{r['settings']}", flush=True)
    print("\nratios lorakit / PEFT")
    for label, k, p in PAIRS:
        if k in results and p in results:
            a, b = results[k], results[p]
            print(f"  {label:45} {k:>10} / {p:11}  tok/s {a['tok_s'] / b['tok_s']:5.2f}x   "
                  f"peak rss {a['peak_rss_mib'] / b['peak_rss_mib']:5.2f}x")


if __name__ == "__main__":
    main()
