"""`lorakit plan` against the measured peak of `lorakit train`: how right is the predicted peak memory?

Each configuration runs in a fresh process (bench/harness.py, WITHOUT the MALLOC_TUNE allocator settings of
the speed benchmarks: they keep freed memory, which suits timing, not a memory measurement) that does what a
user does: `lorakit plan run.yaml --json` (its prediction), then `lorakit train run.yaml` through
lorakit.cli.main, then reads its own VmHWM (the kernel's peak RSS) from /proc/self/status.

Models: Llama shapes with seeded random bf16 weights saved once (like a hub checkpoint: safetensors, a
32000-word word-level tokenizer); data: text records of random words over the whole vocabulary, longer than
max_seq_len, so every row is exactly max_seq_len tokens, all supervised (the planner's worst case, here
realized); LoRA r=16 alpha=32 on q,k,v,o; 3 optimizer steps (the peak is reached from step 2 on: step 1
has no AdamW state and a heap not yet fragmented). The `tiny` preset (2 layers, 32 wide, vocab 512) measures
the runtime: its peak is Python + torch + transformers + lorakit training nothing of size; the planner's
runtime item is that process's RSS at planning time plus lorakit.plan.check.RUNTIME_EXTRA_CPU, calibrated here.
The dpo-* configurations train objective dpo on random-word pairs (batch/2 pairs, so as many rows): dpo-fp32 and
dpo-bf16 with completions that fill the rows (every position scored, the plan's assumption without a cap),
dpo-fp32-capped with prompt and completions cut to half a row each (preference.max_prompt_len and
max_completion_len), which tells the plan that only half of each row is scored. Every row is max_seq_len tokens.

  40m   hidden 512, 8 layers, 8 heads, intermediate 1376, vocab 32000; batch 4 x 256
  150m  hidden 768, 12 layers, 12 heads, intermediate 2048, vocab 32000; batch 4 x 512 (bench/train_speed.py)
  7b    bench/memory_7b.py's Llama-2-7B-shaped checkpoint (run that first), 4-bit NF4 + double quantization,
        gradient checkpointing, batch 1 x 512, as memory_7b measures it (~5 GB, ~5 min)
  gqa   hidden 640, 10 layers, 10 heads of which 2 key/value heads, intermediate 1792, vocab 49152; batch 2 x 768:
        a shape none of the planner's measured constants was fitted on

    python bench/plan_accuracy.py                       # tiny, 40m and 150m, all configurations (~3 min)
    python bench/plan_accuracy.py --presets tiny,gqa    # the held-out shape (~1 min)
    python bench/plan_accuracy.py --presets 7b          # the 7B 4-bit run alone
    python bench/plan_accuracy.py --presets 40m --configs bf16,bf16-gc
    python bench/plan_accuracy.py --presets tiny,40m,150m --configs dpo-fp32,dpo-fp32-capped   # DPO, any CPU

Columns: predicted and measured peak (GB = 1e9 bytes), error = predicted / measured - 1; above runtime =
the same for the part above the tiny run (predicted minus the tiny's predicted peak, measured minus its
measured peak: the model-dependent part), when the tiny preset ran in the same invocation.
"""
import argparse, json, os, random, sys, tempfile, time
from pathlib import Path

import harness

PRESETS = {
    "tiny": dict(hidden=32, layers=2, heads=4, inter=64, vocab=512, batch=4, seq=256),
    "40m": dict(hidden=512, layers=8, heads=8, inter=1376, vocab=32000, batch=4, seq=256),
    "150m": dict(hidden=768, layers=12, heads=12, inter=2048, vocab=32000, batch=4, seq=512),
    "7b": dict(hidden=4096, layers=32, heads=32, inter=11008, vocab=32000, batch=1, seq=512),
    # not used to fit the constants: grouped-query heads, another vocabulary, batch and length
    "gqa": dict(hidden=640, layers=10, heads=10, kv_heads=2, inter=1792, vocab=49152, batch=2, seq=768),
}
CONFIGS = {  # name -> --set overrides
    "bf16": [],
    "bf16-gc": ["train.gradient_checkpointing=true"],
    "bf16-full-logits": ["train.loss_chunk_tokens=null"],
    "fp32": ["model.dtype=float32"],
    "4bit": ["model.quantization={bits: 4}"],
    "4bit-gc": ["model.quantization={bits: 4}", "train.gradient_checkpointing=true"],
    # DPO (objective dpo, batch/2 pairs = the same rows): fp32, which any CPU computes at full speed
    "dpo-fp32": ["model.dtype=float32"],
    "dpo-fp32-capped": ["model.dtype=float32", "preference.max_completion_len={half}",
                        "preference.max_prompt_len={rest}"],
    "dpo-bf16": [],
}
PREFERENCE = {  # name -> (prompt words, completion words) as fractions of max_seq_len
    "dpo-fp32": (0.02, 1.0),  # the completions fill the rows: every position scored, the plan's assumption
    "dpo-fp32-capped": (1.0, 1.0),  # cut to half a row each: half of each row scored, as max_completion_len says
    "dpo-bf16": (0.02, 1.0),
}
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} </s> {% endfor %}"  # a turn ends with </s>
DEFAULT_CONFIGS = {"tiny": ["bf16", "4bit"], "40m": list(CONFIGS), "150m": list(CONFIGS), "7b": ["4bit-gc"],
                   "gqa": ["bf16", "bf16-gc", "4bit"]}
STEPS = 3


def save_model(path: Path, shape: dict) -> Path:
    """A seeded random Llama of `shape` in bf16 and a word-level tokenizer ("w<id>" words), once."""
    if (path / "config.json").is_file():
        return path
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape.get("kv_heads", shape["heads"]),
                         intermediate_size=shape["inter"], vocab_size=shape["vocab"], max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, shape["vocab"])]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    return path


def write_run(work: Path, model: Path, shape: dict, rows: int = 16, preference: tuple | None = None) -> Path:
    """Text data longer than max_seq_len (every row exactly max_seq_len tokens) and a run config; with
    `preference` (prompt, completion words as fractions of max_seq_len), DPO pairs and objective dpo."""
    rng = random.Random(0)
    if preference is not None:
        return _write_dpo_run(work, model, shape, rows, preference, rng)
    data = work / "train.jsonl"
    with open(data, "w") as f:
        for _ in range(rows):
            words = " ".join(f"w{rng.randrange(3, shape['vocab'])}" for _ in range(shape["seq"] + 8))
            f.write(json.dumps({"text": words}) + "\n")
    config = work / "run.yaml"
    config.write_text(f"""\
model: {{name_or_path: {model}}}
lora: {{r: 16, lora_alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}}
data: {{train: {data}, format: text, packing: false, max_seq_len: {shape['seq']}}}
train: {{max_steps: {STEPS}, batch_size: {shape['batch']}, save_every: null, log_every: 1}}
output_dir: {work / 'out'}
""")
    return config


def _write_dpo_run(work: Path, model: Path, shape: dict, rows: int, preference: tuple, rng) -> Path:
    def words(fraction: float) -> str:
        return " ".join(f"w{rng.randrange(3, shape['vocab'])}" for _ in range(int(fraction * shape["seq"])))

    data = work / "pairs.jsonl"
    with open(data, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"prompt": words(preference[0]), "chosen": words(preference[1]),
                                "rejected": words(preference[1])}) + "\n")
    config = work / "run.yaml"
    config.write_text(f"""\
model: {{name_or_path: {model}}}
objective: dpo
lora: {{r: 16, lora_alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}}
data: {{train: {data}, max_seq_len: {shape['seq']}}}
train: {{max_steps: {STEPS}, batch_size: {max(shape['batch'] // 2, 1)}, save_every: null, log_every: 1}}
output_dir: {work / 'out'}
""")
    return config


# ----------------------------------------------------------------------------- worker side
def worker(config: str, overrides: list[str]) -> None:
    import contextlib
    import io

    from lorakit.cli import main

    sets = [x for o in overrides for x in ("--set", o)]
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        assert main(["plan", config, "--json", *sets]) == 0
    plan = json.loads(captured.getvalue().strip().splitlines()[-1])
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["train", config, "--overwrite", *sets])  # each shape reuses the work directory
    status = {k: int(v.split()[0]) * 1024 for k, _, v in
              (line.partition(":") for line in Path("/proc/self/status").read_text().splitlines())
              if k in ("VmHWM", "VmRSS")}
    print("RESULT " + json.dumps({"code": code, "plan": plan, "peak": status["VmHWM"]}), flush=True)


# ----------------------------------------------------------------------------- driver side
def cache_dir(preset: str) -> Path:
    if preset == "7b":
        sys.path.insert(0, str(Path(__file__).parent))
        from memory_7b import default_dir

        return default_dir("7b")
    return Path(os.environ.get("LORAKIT_BENCH_DIR", "~/.cache/lorakit-bench")).expanduser() / f"plan-{preset}"


def measure(preset: str, config_name: str) -> dict:
    shape = PRESETS[preset]
    model = cache_dir(preset)
    if preset == "7b" and not (model / "model.safetensors.index.json").is_file():
        sys.exit(f"error: no 7B checkpoint in {model}; write it with python bench/memory_7b.py --skip-peft")
    if preset != "7b":
        save_model(model, shape)
        _chat_template(model)
    half = shape["seq"] // 2
    overrides = [o.replace("{half}", str(half)).replace("{rest}", str(shape["seq"] - half)) for o in CONFIGS[config_name]]
    if preset == "7b":  # memory_7b's settings: 4-bit NF4, bf16 compute, checkpointing, fp32 adapters
        overrides += ["model.dtype=bfloat16", "model.device=cpu"]
    with tempfile.TemporaryDirectory() as work:
        config = write_run(Path(work), model, shape, preference=PREFERENCE.get(config_name))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(config), *overrides]
        t0 = time.perf_counter()
        result = harness.run_worker(cmd, f"{preset}/{config_name}", malloc_tune=False)
    result["seconds"] = time.perf_counter() - t0
    return result


def _chat_template(model: Path) -> None:
    """Models saved before the DPO cases existed get the chat template their pairs are rendered with."""
    path = model / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if config.get("chat_template") != CHAT_TEMPLATE:
        path.write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}, indent=2))


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")), "?")
    mem = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
    return f"{model}, {os.cpu_count()} cores, {mem / 2**20:.1f} GiB RAM, loadavg {os.getloadavg()[0]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,40m,150m")
    ap.add_argument("--configs", default=None, help="comma-separated names from: " + ", ".join(CONFIGS))
    ap.add_argument("--items", action="store_true", help="print each prediction's items")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.worker:
        return worker(args.worker, rest)

    from importlib.metadata import version

    print(f"machine: {machine()}")
    print("versions: " + "  ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "bitsandbytes", "lorakit")))
    print(f"settings: LoRA r=16 on q,k,v,o, {STEPS} steps, text rows of exactly max_seq_len tokens, all supervised")
    hdr = (f"{'preset':6} {'config':17} {'batch':>9} {'predicted':>9} {'measured':>9} {'error':>7} "
           f"{'above runtime: pred / meas':>27} {'error':>7} {'s':>5}")
    print(hdr + "\n" + "-" * len(hdr), flush=True)
    runtime = {}
    for preset in args.presets.split(","):
        shape = PRESETS[preset]
        # tiny measures the runtime the other rows are compared above: always its own two configurations
        names = args.configs.split(",") if args.configs and preset != "tiny" else DEFAULT_CONFIGS[preset]
        for name in names:
            r = measure(preset, name)
            predicted, measured = r["plan"]["peak_bytes"], r["peak"]
            kind = "4bit" if "4bit" in name else "16"
            if preset == "tiny":
                runtime[kind] = (predicted, measured)
            line = (f"{preset:6} {name:17} {shape['batch']:>3} x {shape['seq']:<4} {predicted / 1e9:9.3f} "
                    f"{measured / 1e9:9.3f} {predicted / measured - 1:+7.1%}")
            base = runtime.get(kind)
            if base is not None and preset != "tiny":
                p, m = predicted - base[0], measured - base[1]
                line += f" {p / 1e9:12.3f} / {m / 1e9:.3f} GB {p / m - 1:+7.1%}"
            else:
                line += " " * 36
            print(line + f" {r['seconds']:5.0f}" + ("" if r["code"] == 0 else f"  (train exit code {r['code']})"),
                  flush=True)
            if args.items:
                for item in r["plan"]["items"]:
                    print(f"    {item['name']:<30} {item['bytes'] / 1e9:7.3f} GB  {item['note']}")


if __name__ == "__main__":
    main()
