"""The quickstart run: config, before/after generations, training, merge."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..base_model import LoadedModel, load_base_model
from ..config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ..export import merge_to_directory
from ..lora import LoraConfig, load_adapter

ASSETS = Path(__file__).parent / "assets"


def quickstart_config(output_dir: str | Path, *, max_steps: int = 1000) -> RunConfig:
    """The run the quickstart makes; `lorakit quickstart --print-config` shows it as YAML."""
    return RunConfig(
        # fp32: at 1.3M parameters bf16 rounding costs this copy task most of its accuracy (measured: 1/5 exact in
        # bf16 against 5/5 in fp32 on the demo prompts), and matmuls this small gain nothing from AMX (the fp32
        # run was the faster one, 108 s against 142 s end to end).
        model=ModelConfig(name_or_path=str(ASSETS / "model"), dtype="float32"),
        lora=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
        data=DataConfig(train=str(ASSETS / "data" / "train.jsonl"), validation=str(ASSETS / "data" / "val.jsonl"),
                        max_seq_len=96),
        train=TrainConfig(max_steps=max_steps, batch_size=16, lr=3e-3, warmup_steps=max_steps // 10, lr_schedule="linear",
                          eval_every=max(1, max_steps // 5), save_every=max_steps, keep_checkpoints=1, seed=0,
                          log_every=50),
        output_dir=str(output_dir),
    )


@dataclass
class QuickstartResult:
    prompts: list[str]
    expected: list[str]
    before: list[str]
    after: list[str]
    eval_losses: list[tuple[int, float]]
    merged_dir: Path
    seconds: float

    @property
    def correct_before(self) -> int:
        return sum(b.strip() == e for b, e in zip(self.before, self.expected))

    @property
    def correct_after(self) -> int:
        return sum(a.strip() == e for a, e in zip(self.after, self.expected))


def _answers(loaded: LoadedModel, model: torch.nn.Module, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    tokenizer = loaded.tokenizer
    out = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"].to(loaded.device)
        with torch.no_grad():
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


def run_quickstart(output_dir: str | Path = "lorakit-quickstart", *, max_steps: int = 1000, overwrite: bool = False,
                   log: Callable[[str], None] = print) -> QuickstartResult:
    """`overwrite` replaces an earlier quickstart in `output_dir` (without it, one there is refused)."""
    from ..train.output_dir import check_output_dir
    from ..recipes.sft import run_training

    started = time.perf_counter()
    output_dir = Path(output_dir)
    config = quickstart_config(output_dir, max_steps=max_steps)
    check_output_dir(output_dir, resume="never", overwrite=overwrite, option="--out",  # before the first step
                     resume_option=None)
    demo = json.loads((ASSETS / "data" / "demo_prompts.json").read_text(encoding="utf-8"))
    prompts, expected = [d["prompt"] for d in demo], [d["expected"] for d in demo]

    log("== 1/4  the base model on held-out prompts (it has never seen JSON)")
    base = load_base_model(config.model)
    before = _answers(base, base.model, prompts)
    for prompt, answer in zip(prompts, before):
        log(f"  {prompt}\n    -> {answer}")

    log(f"\n== 2/4  training a LoRA adapter (r={config.lora.r}, {config.train.max_steps} steps) on "
        f"{Path(config.data.train).name}")
    result = run_training(config, resume="never", overwrite=overwrite, log=log)
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    eval_losses = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    log("validation loss: " + "  ".join(f"step {s}: {v:.3f}" for s, v in eval_losses))

    log("\n== 3/4  the same prompts with the adapter")
    adapted = load_base_model(config.model)
    lora_model = load_adapter(adapted.model, result.adapter_dir)
    after = _answers(adapted, lora_model, prompts)
    for prompt, old, new in zip(prompts, before, after):
        log(f"  {prompt}\n    before: {old}\n    after:  {new}")

    log("\n== 4/4  merging the adapter into the base model")
    merged_dir = merge_to_directory(load_base_model(ModelConfig(name_or_path=config.model.name_or_path, dtype="float32",
                                                                device="cpu")),
                                    result.adapter_dir, output_dir / "merged", overwrite=True)
    outcome = QuickstartResult(prompts, expected, before, after, eval_losses, merged_dir, time.perf_counter() - started)
    log(f"\nexact JSON answers on held-out prompts: {outcome.correct_before}/{len(prompts)} before, "
        f"{outcome.correct_after}/{len(prompts)} after")
    log(f"adapter: {result.adapter_dir}\nmerged model: {merged_dir} (loads with AutoModelForCausalLM.from_pretrained)\n"
        f"done in {outcome.seconds:.0f} s")
    return outcome
