"""The run config's sections: typed dataclasses, a docstring per field (what `lorakit train --help` prints)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..data.options import DataOptions
from ..lora.config import LoraConfig


@dataclass(kw_only=True)
class QuantizationConfig:
    bits: Literal[4, 8]
    """4: QLoRA's 4-bit base (about 0.5 bytes per weight); 8: LLM.int8 (about 1 byte per weight). Needs
    bitsandbytes: pip install 'lorakit[quant]'."""
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type; NF4 (normal float) is what QLoRA recommends."""
    double_quant: bool = True
    """4-bit: quantize the per-block scales as well (saves about 0.4 bits per weight)."""
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """dtype the 4-bit weights are dequantized to for each matmul; auto: the same as model.dtype."""


@dataclass(kw_only=True)
class ModelConfig:
    name_or_path: str
    """A local directory, a Hugging Face hub id (e.g. "Qwen/Qwen2.5-0.5B"), or a GGUF file (./model.Q4_K_M.gguf,
    the model llama.cpp or Ollama runs): its weights are dequantized once into lorakit's cache and trained on."""
    gguf_file: str | None = None
    """The GGUF file inside name_or_path when that is a hub repo or a directory (e.g.
    "SmolLM2-135M-Instruct.Q4_1.gguf"); null: name_or_path is a model directory, hub id or .gguf file."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Compute dtype of the frozen base. auto: bfloat16 on GPUs and on CPUs with bf16 matrix units
    (AMX / AVX-512-BF16), float32 elsewhere. Trainable LoRA weights follow adapter_dtype."""
    quantization: QuantizationConfig | None = None
    """Load the base in 4 or 8 bits, e.g. {bits: 4, type: nf4, double_quant: true}; null: not quantized.
    The checkpoint is quantized tensor by tensor as it is read, never held whole in 16 bits."""
    adapter_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the trainable LoRA weights (and so of their optimizer state). float32 keeps small updates
    from rounding away; bfloat16 halves their memory."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto picks CUDA, then MPS, then the CPU."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub checkpoint. Off unless you trust its author."""
    attn_implementation: str | None = None
    """transformers attention backend ("sdpa", "eager", "flash_attention_2"); None lets transformers choose."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""


@dataclass(kw_only=True)
class DataConfig(DataOptions):
    """The data section: where the data is, plus every DataOptions field (format, template, max_seq_len, ...),
    which lorakit.data.options defines, documents and checks once for the run config and the Python API."""

    train: str | None = None
    """Training data: a JSON, JSONL, CSV or Parquet file, or a hub dataset name. Required, unless `tasks` lists
    several datasets (then the other data fields apply to each of them)."""
    validation: str | None = None
    """Validation data file; or leave empty and set validation_fraction."""
    validation_fraction: float = 0.0
    """Fraction of the training records held out for validation (fixed seed) when no file is given."""


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int | None = None
    """Optimizer steps to run; None: run `epochs` epochs."""
    epochs: float = 1.0
    batch_size: int = 4
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size x grad_accum)."""
    lr: float = 2e-4
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this; None disables clipping."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: learning rate of B = lr x this ratio (e.g. 16); None trains A and B at the same rate."""
    gradient_checkpointing: bool = False
    checkpoint_every: int = 1
    """With gradient_checkpointing, recompute only every k-th decoder layer: less recomputation, more memory."""
    loss_chunk_tokens: int | None = 1024
    """Compute the output projection and loss this many tokens at a time, recomputed in backward, so the full
    logits are never held; None: all at once."""
    seed: int = 0
    eval_every: int | None = None
    """Evaluate every N optimizer steps (and always at the end); None: only at the end."""
    save_every: int | None = None
    """Checkpoint every N optimizer steps (and at the end)."""
    keep_checkpoints: int = 3
    log_every: int = 1
    nan_policy: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss: stop keeping the last good checkpoint, or skip the step."""
    resume: str = "never"
    """"never", "auto" (the latest complete checkpoint in output_dir), or a checkpoint directory."""
    tensorboard: bool = False
    memory_check: bool = True
    """Before loading the model, refuse a run whose predicted peak memory (`lorakit plan`) exceeds the memory
    available, naming settings that would fit; false (or `lorakit train --force`) trains anyway."""


@dataclass(kw_only=True)
class SpeedConfig:
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile each decoder layer and the loss (fuses norms, rotary embedding, activations, casts and the
    softmax of the loss). Compiling takes 30-60 s once, so auto compiles only runs of at least 300 steps on a
    model of at least 20M parameters, with a 16-bit base (not 4/8-bit), no gradient checkpointing, and a C++
    compiler on CPU; on: always (an error if it cannot); off: never. Compiled graphs are kept in
    $LORAKIT_CACHE/inductor (default ~/.cache/lorakit/inductor; TORCHINDUCTOR_CACHE_DIR overrides it): once a
    run has compiled the same layers, a later one compiles in seconds and auto compiles runs from 50 steps."""
    adapter_compute: Literal["auto", "adapter"] = "auto"
    """auto: LoRA's matmuls run in the base layer's dtype (bf16 on a bf16 base) while the adapter weights stay
    fp32 master copies; adapter: in the adapter's dtype (fp32 activations, as PEFT computes; slower)."""


@dataclass(kw_only=True)
class DistributedConfig:
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Used when torchrun starts the run on several processes (WORLD_SIZE > 1), ignored otherwise. ddp: every
    process holds the whole base model and trains on its share of each step's micro-batches; the LoRA
    gradients are summed across processes. fsdp: the same, with each decoder layer's frozen weights sharded
    across the processes (PyTorch FSDP2), so each holds about 1/N of them; not for 4/8-bit bases."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """auto: nccl when CUDA is available, else gloo (CPU)."""
    timeout_s: int = 1800
    """How long a process waits for the others in a collective before failing (instead of hanging)."""


@dataclass(kw_only=True)
class TaskConfig:
    name: str
    """The task's adapter name (1-64 letters, digits, '_' or '-'); it is saved to <output_dir>/adapter/<name>."""
    train: str
    """The task's training data file (read with the data section's format, template and length options)."""
    validation: str | None = None
    """The task's validation data file; none: this task is not evaluated."""
    lora: LoraConfig | None = None
    """This adapter's LoRA options (rank, targets, ...), replacing the run's lora section for it; none: the run's."""
    lr: float | None = None
    """This adapter's peak learning rate (its own AdamW group, on the run's schedule); none: train.lr."""


@dataclass(kw_only=True)
class ReferenceConfig:
    adapter: str | None = None
    """An adapter directory (usually the SFT run's adapter/): the policy starts from it, and a frozen copy of it is
    the reference, held as a second adapter on the same base (no second model). null: a new adapter is trained
    (the lora section) and the reference is the base with adapters disabled."""
    precompute: bool = False
    """Compute the reference log-probabilities of every example once before training (and keep them beside the
    data), so each step runs the model once instead of twice. Same losses; not for simpo or orpo (no reference)."""


@dataclass(kw_only=True)
class PreferenceConfig:
    """Preference tuning (objective: dpo, orpo or kto). The names follow TRL's DPOConfig / ORPOConfig / KTOConfig."""

    beta: float = 0.1
    """How far the policy may move from the reference: higher keeps it closer (DPO's and KTO's beta; for ipo the
    regularisation tau; for simpo the reward scale)."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "simpo"] = "sigmoid"
    """dpo only. sigmoid: DPO (Rafailov et al. 2023), with label_smoothing > 0 conservative DPO (cDPO); robust:
    robust DPO for noisy labels (Chowdhury et al. 2024); ipo: IPO (Azar et al. 2023, eq. 17, per-token mean
    log-ratios); hinge: SLiC's hinge on the reward margin; simpo: SimPO (Meng et al. 2024), reference-free, on the
    mean log-probability per token, with margin simpo_gamma."""
    label_smoothing: float = 0.0
    """The probability that a pair's preference is flipped, in [0, 0.5): for sigmoid (cDPO), robust and simpo."""
    simpo_gamma: float = 0.5
    """simpo: the target reward margin gamma (the loss uses gamma / beta)."""
    orpo_lambda: float = 0.1
    """orpo: weight of the odds-ratio term beside the chosen completion's cross-entropy (TRL's ORPOConfig.beta)."""
    desirable_weight: float = 1.0
    """kto: weight of the desirable (label true) examples' losses."""
    undesirable_weight: float = 1.0
    """kto: weight of the undesirable (label false) examples' losses."""
    reference: ReferenceConfig | Literal["base"] = field(default_factory=ReferenceConfig)
    """The reference model, e.g. {adapter: runs/sft/adapter, precompute: true}; the default {} (or `base`) is the
    base model with adapters disabled: the same weights, no second copy in memory."""
    max_prompt_len: int | None = None
    """Keep at most this many tokens of each prompt, its END (the part next to the completion); null: no limit of
    its own. Prompt plus completion must still fit data.max_seq_len: a prompt that fills it is a bad record."""
    max_completion_len: int | None = None
    """Keep at most this many tokens of each completion, its start; null: what data.max_seq_len leaves."""

    def __post_init__(self) -> None:
        if self.reference == "base":  # the YAML shorthand `reference: base`
            self.reference = ReferenceConfig()


@dataclass(kw_only=True)
class RewardConfig:
    """One reward function of objective grpo: a built-in or the user's own, with its weight in the sum."""

    function: str
    """A built-in (exact_match, regex_match, json_valid, json_schema, numeric_equal, length_penalty) or your own,
    named "module:function" (importable from the working directory), called as f(prompt=, completion=, record=)
    and returning a number."""
    weight: float = 1.0
    """Its weight in the summed reward."""
    name: str | None = None
    """Its name in the metrics (reward/NAME); default: the function's."""
    column: str | None = None
    """exact_match, numeric_equal: the record's column holding the expected answer (default answer)."""
    pattern: str | None = None
    """regex_match: the regular expression searched for in the completion."""
    schema: str | None = None
    """json_schema: the path of a JSON schema file the completion must validate against."""
    max_chars: int | None = None
    """length_penalty: completions longer than this many characters lose 1 per max_chars beyond it."""
    tolerance: float | None = None
    """numeric_equal: how far the number may be from the answer (default 1e-6)."""


@dataclass(kw_only=True)
class RLConfig:
    """Reinforcement learning from verifiable rewards (objective: grpo). The names follow TRL's GRPOConfig. The
    prompts are data.train (any chat format: the prompt part is used, the rest of the record goes to the
    rewards); data.validation's prompts are answered greedily at each evaluation and their rewards logged."""

    num_generations: int = 8
    """Completions sampled per prompt (the group G whose rewards are compared). train.batch_size counts prompts,
    so a micro-batch holds batch_size x num_generations completions."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (the log-probs are those of this distribution)."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts; 1.0: the whole distribution."""
    max_completion_len: int = 256
    """Tokens generated per completion at most (one cut at this length scores what it wrote so far)."""
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "dapo"
    """How token losses are averaged. grpo: per completion, then over completions (long completions weigh less
    per token); dr_grpo: summed and divided by completions x max_completion_len (no length bias); dapo (TRL's
    default): summed over the step's tokens and divided by their number."""
    epsilon: float = 0.2
    """Clipping of the probability ratio: [1 - epsilon, 1 + epsilon_high]."""
    epsilon_high: float | None = None
    """The upper clip (DAPO's clip-higher, e.g. 0.28); null: epsilon."""
    beta: float = 0.0
    """Weight of the KL penalty to the reference (the base with adapters disabled); 0 (current practice) skips
    the reference forward."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group's reward standard deviation, the batch's, or nothing (Dr. GRPO)."""
    num_iterations: int = 1
    """Optimizer steps per rollout (GRPO's mu): 1 samples fresh completions every step (on-policy); mu > 1 trains
    mu steps on each rollout, the ratio to the sampling policy clipped to [1 - epsilon, 1 + epsilon_high]."""
    rewards: list[RewardConfig] = field(default_factory=list)
    """The reward functions, summed with their weights, e.g. [{function: json_valid}, {function: exact_match,
    column: answer, weight: 2}]."""
    sample_every: int | None = 10
    """Write every N-th step's completions with their rewards to samples/step-N.jsonl (null: never)."""
    max_prompt_len: int | None = None
    """Prompts longer than this many tokens are bad records (reported with file:line, or skipped with
    data.skip_bad_records); null: data.max_seq_len - max_completion_len, so prompt and completion fit
    data.max_seq_len."""

    def prompt_budget(self, max_seq_len: int) -> int:
        return self.max_prompt_len if self.max_prompt_len is not None else max_seq_len - self.max_completion_len


@dataclass(kw_only=True)
class ForgettingLimits:
    """How far the adapter may move the model away from its base on the general text (eval.max_forgetting)."""

    loss_increase: float | None = None
    """The most the general text's loss (mean cross-entropy per token, nats) may rise above the base's:
    general_loss - general_loss_base; null: no limit on it."""
    kl: float | None = None
    """The most the mean KL(base || adapter) of the next-token distributions over the general text's tokens (nats)
    may be; null: no limit on it."""


@dataclass(kw_only=True)
class EvalConfig:
    """What each evaluation measures besides the validation data: forgetting, on general text."""

    general_text: str | None = None
    """A data file of general text (any format the data section reads: text, messages, alpaca, ...; its format is
    detected, the other data options are the run's). At each evaluation (train.eval_every, and at the end) its loss
    is reported with the adapter (general_loss) and without (general_loss_base: the same model with adapters
    disabled, no second copy), with the mean KL from the base's next-token distribution (general_kl)."""
    max_forgetting: ForgettingLimits | None = None
    """Limits on forgetting, e.g. {loss_increase: 0.1, kl: 0.05} (either or both; needs general_text). An
    evaluation over either limit warns or stops the run (on_forgetting); the best checkpoint is then the best of
    the evaluations that stayed within them, and rotation keeps it. null: report the numbers only."""
    on_forgetting: Literal["stop", "warn"] = "stop"
    """What an evaluation over max_forgetting does. stop: end the run there (its checkpoint is saved as usual)
    and write the best checkpoint within the limits to <output_dir>/adapter (if none stayed within them, the
    adapter as trained, and the log and trainer_state.json say so); warn: log a warning and go on."""


@dataclass(kw_only=True)
class SweepConfig:
    """A grid of settings trained in one run, one adapter per combination (a member): every member sees the same
    batches, each row routed through its member's adapter, with its own learning rate on the run's schedule and
    its own gradient clipping, so each equals training that configuration alone. Fields left out take the lora
    and train sections' value. After training the members are ranked in <output_dir>/sweep.json and the best is
    copied to <output_dir>/best_adapter."""

    lr: list[float] | None = None
    """Peak learning rates, e.g. [1.0e-4, 3.0e-4, 1.0e-3]."""
    r: list[int] | None = None
    """LoRA ranks, e.g. [8, 16, 32]."""
    lora_alpha: list[float] | None = None
    """LoRA alphas (the update is scaled by lora_alpha / r)."""
    target_modules: list[list[str] | str] | None = None
    """Target module sets, e.g. [[q_proj, v_proj], all-linear]."""
    init_lora_weights: list[bool | str] | None = None
    """Initialisations: true (kaiming A, zero B) or gaussian; pissa changes the base weights the members share,
    so a sweep refuses it."""
    lora_dropout: list[float] | None = None
    """Dropout rates on the LoRA input. The members draw their masks from one random stream, so with dropout a
    member equals its run alone in distribution, not bit for bit."""
    metrics: list[str] = field(default_factory=list)
    """Generation metrics scored after training on data.validation's prompts (greedy), as `lorakit eval --metrics`
    does: exact, contains, json_valid, json_fields, rouge_l. Empty: rank by validation loss alone."""
    rank_by: str = "eval_loss"
    """What orders the members: eval_loss (lowest first) or one of metrics (highest first)."""
    max_new_tokens: int = 64
    """Longest generated answer for the metrics."""


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig
    objective: str = "sft"
    """The way of training: sft (supervised fine-tuning on the data's supervised tokens); dpo, orpo (pairs of
    {prompt, chosen, rejected}) or kto ({prompt, completion, label}): preference tuning, set in the preference
    section; grpo: reinforcement learning from the rewards of sampled completions, set in the rl section. Each
    way is a recipe in lorakit.recipes (RECIPES)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    """Training speed options; the defaults are the fast path."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Several processes under torchrun; a single process ignores it."""
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    """Preference tuning settings (objective: dpo, orpo or kto); ignored by sft."""
    rl: RLConfig = field(default_factory=RLConfig)
    """RL settings (objective: grpo): group size, sampling, loss variant, rewards; ignored by the others."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Forgetting on general text, measured at each evaluation and optionally limited; works for every objective."""
    output_dir: str = "runs/lorakit"
    """Where the adapter, checkpoints, metrics and plots go."""
    tasks: list[TaskConfig] = field(default_factory=list)
    """Several adapters trained in one run, one per task: each batch holds rows of every task, each row routed
    through its task's adapter, so one pass over the frozen base trains them all; each adapter equals what
    training it alone on the same rows would give. E.g. [{name: sql, train: sql.jsonl}, {name: chat, train:
    chat.jsonl, lora: {r: 16}}]. Leave data.train empty then."""
    sweep: SweepConfig | None = None
    """A one-pass hyperparameter sweep over data.train (objective sft): e.g. {lr: [1.0e-4, 3.0e-4], r: [8, 16]}
    trains 4 adapters in one run, saved to <output_dir>/adapter/<member>; see the sweep section's fields."""
    deploy_targets: list[str] = field(default_factory=list)
    """Servers the adapter is for: any of vllm, llama.cpp, ollama, peft. Before the model loads, the lora section
    is checked against what each accepts (as `lorakit check` does): one that would refuse the adapter stops the
    run naming the lora field to change (remove the target to train anyway); silently mishandled options are
    logged. E.g. [vllm, ollama]."""

    def adapters(self) -> list[tuple[str, LoraConfig]]:
        """The adapters this run trains, as (adapter name, its LoRA config): one per task (the task's own lora,
        else the run's), or the run's lora section as "default"."""
        return [(task.name, task.lora or self.lora) for task in self.tasks] or [("default", self.lora)]
