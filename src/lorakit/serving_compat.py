"""Will the server an adapter is meant for load it, and compute what lorakit trained?

`check(lora_config, targets, facts=..., base_config=...)` applies each destination's rules to a LoRA config,
optionally the adapter file's tensor names and shapes (`AdapterFacts`) and the base model's config.json, and
returns `Finding`s. `lorakit check ADAPTER` runs it on a saved adapter; `deploy_targets:` in a run config runs
it on the `lora:` section before training starts.

Severities:
- refused: the destination errors out, on every route lorakit knows to it.
- mishandled: it loads but computes something else (a scale dropped, a feature ignored).
- note: worth knowing: one route refused while another works, a version-dependent rule, an unchecked part.

llama.cpp and Ollama are reached by more than one route: the adapter alone (`lorakit export --format
lora-gguf`, llama.cpp's convert_lora_to_gguf.py, Ollama's `ADAPTER <dir>`) or a merged model (`lorakit
export --format gguf|ollama`). A feature that only the adapter routes refuse is a note naming the route that
works. Every rule cites the file it was read from (as stored in 2026-11); rules that changed between releases
say so. Each fix names the `lora:` field to change.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError
from .lora.config import DEFAULT_TARGETS, LoraConfig

TARGETS = ("vllm", "llama.cpp", "ollama", "peft")
REFUSED, MISHANDLED, NOTE = "refused", "mishandled", "note"
PREFIX = "base_model.model."  # PEFT's tensor-name prefix (lora/io.py)

# vllm-project/vllm vllm/config/lora.py: `MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]`,
# `max_lora_rank: MaxLoRARanks = 16` (older releases allowed fewer values, e.g. at most 64 in early 2024).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
# vllm-project/vllm vllm/model_executor/models/{llama,mistral,qwen2}.py: the classes implement SupportsLoRA;
# `embedding_modules` names the embeddings LoRA may target: Llama's holds embed_tokens and lm_head; in recent
# versions Mistral's ("We don't support LoRA on the embedding layers") and Qwen2's are empty.
VLLM_LORA_ARCHS = {"LlamaForCausalLM": ("embed_tokens", "lm_head"), "MistralForCausalLM": (), "Qwen2ForCausalLM": ()}
# vllm-project/vllm vllm/model_executor/models/gpt2.py: GPT2LMHeadModel(nn.Module, SupportsPP), no SupportsLoRA,
# so vllm/v1/worker/lora_model_runner_mixin.py raises "GPT2LMHeadModel does not support LoRA yet."
VLLM_NO_LORA_ARCHS = ("GPT2LMHeadModel",)
# ollama/ollama convert/convert.go ConvertAdapter: the base GGUF's general.architecture must be "llama" (Llama,
# and Mistral, which llama.cpp converts as llama) or "gemma2", else "unsupported architecture".
OLLAMA_ADAPTER_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Gemma2ForCausalLM")
# ollama/ollama fs/ggml/ggml.go OllamaEngineRequired(): these GGUF architectures (among lorakit's exports) run on
# Ollama's own engine, whose runner/ollamarunner/runner.go refuses any adapter when the model loads ("loras are not
# yet implemented"), though `ollama create` accepts the ADAPTER line; the others run on llama.cpp, which applies it.
OLLAMA_ENGINE_NO_LORA = {"Qwen3ForCausalLM": "qwen3", "Gemma3ForCausalLM": "gemma3"}
# ollama/ollama convert/convert_llama_adapter.go Replacements(): only these projections get llama.cpp names.
OLLAMA_ADAPTER_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBEDDINGS = ("embed_tokens", "lm_head")

SRC_VLLM_HELPER = "vllm-project/vllm vllm/lora/peft_helper.py (PEFTHelper._validate_features, validate_legal)"
SRC_LLAMACPP_CONVERT = "ggml-org/llama.cpp convert_lora_to_gguf.py (get_tensors: 'Not a lora_A or lora_B tensor')"
SRC_LLAMACPP_SCALE = ("ggml-org/llama.cpp src/llama-adapter.h (get_scale: alpha / rank) and "
                      "convert_lora_to_gguf.py (one adapter.lora.alpha from lora_alpha)")
SRC_LORAKIT_GGUF = "lorakit src/lorakit/export/gguf.py (ARCHITECTURES), export/lora_gguf.py"
SRC_OLLAMA_CONVERT = "ollama/ollama convert/convert.go (ConvertAdapter), convert/convert_llama_adapter.go"
SRC_OLLAMA_LOAD = SRC_OLLAMA_CONVERT + "; ggml-org/llama.cpp src/llama-adapter.cpp (unexpected suffix / not in base)"
SRC_OLLAMA_ENGINE = "ollama/ollama fs/ggml/ggml.go (OllamaEngineRequired), runner/ollamarunner/runner.go"
SRC_LORAKIT_GGUF_BASE = "lorakit src/lorakit/gguf_base.py, export/ollama.py (write_ollama_adapter_directory)"


@dataclass(frozen=True)
class Finding:
    target: str
    severity: str
    problem: str
    fix: str
    source: str

    def line(self) -> str:
        return f"{self.target}: {self.severity}: {self.problem}; fix: {self.fix} [{self.source}]"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class AdapterFacts:
    """What an adapter's weights file says beyond its config: PEFT tensor names and shapes (header only)."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    config_keys: frozenset[str] = frozenset()

    def _split(self) -> list[tuple[str, str]]:
        """(module path, tensor kind) per tensor; kind is lora_A, lora_B, embedding_A, embedding_B, dora, bias,
        copy (a module saved whole: modules_to_save) or base (the full embedding PEFT saves beside an embedding
        LoRA as <module>.base_layer.weight, which vLLM's is_base_embedding_weights and llama.cpp's converter skip)."""
        out = []
        for key in self.shapes:
            name = key.removeprefix(PREFIX)
            for suffix, kind in ((".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B"),
                                 (".lora_embedding_A", "embedding_A"), (".lora_embedding_B", "embedding_B"),
                                 (".lora_magnitude_vector", "dora"), (".lora_magnitude_vector.weight", "dora")):
                if name.endswith(suffix):
                    out.append((name.removesuffix(suffix), kind))
                    break
            else:
                kind = "bias" if name.endswith(".bias") else "base" if name.endswith(".base_layer.weight") else "copy"
                module = name.rsplit(".", 1)[0].removesuffix(".base_layer").removesuffix(".modules_to_save")
                out.append((module, kind))
        return out

    def ranks(self) -> dict[str, int]:
        """Module path -> rank, from A's shape: lora_A.weight is (r, in), lora_embedding_A is (r, vocab)."""
        return {m: self.shapes[k][0] for k, (m, kind) in zip(self.shapes, self._split())
                if kind in ("lora_A", "embedding_A") and self.shapes[k]}

    def embedding_vocab(self) -> dict[str, int]:
        return {m: self.shapes[k][1] for k, (m, kind) in zip(self.shapes, self._split())
                if kind == "embedding_A" and len(self.shapes[k]) == 2}

    def modules(self, kind: str) -> list[str]:
        return sorted({m for m, k in self._split() if k == kind})


class _Adapter:
    """The facts the rules read, from the config, the tensors (when given) and the base config (when given)."""

    def __init__(self, config: LoraConfig, facts: AdapterFacts | None, base: dict[str, Any] | None,
                 base_gguf: str | None = None):
        self.config, self.facts, self.base_gguf = config, facts, base_gguf
        archs = (base or {}).get("architectures") or []
        self.arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
        self.vocab = (base or {}).get("vocab_size")
        ranks = facts.ranks() if facts else {}
        self.max_rank = max([config.r, *config.rank_pattern.values(), *ranks.values()])
        self.uneven_rank = bool(config.rank_pattern) or len(set(ranks.values())) > 1
        self.modules = self._adapted(config, ranks, (base or {}).get("model_type"))
        copied = facts.modules("copy") if facts else []
        self.copies = sorted(set(config.modules_to_save or []) | {m.rsplit(".", 1)[-1] for m in copied})
        # a bias inside a module saved whole (modules_to_save) is part of that copy, not bias training
        biases = set(facts.modules("bias")) - set(copied) if facts else set()
        self.bias = config.bias != "none" or bool(biases)
        self.dora = config.use_dora or bool(facts and facts.modules("dora"))
        init = config.init_lora_weights
        self.pissa = isinstance(init, str) and init.startswith("pissa")
        embedded = set(facts.modules("embedding_A")) if facts else set()
        self.embeddings = sorted({m for m in (self.modules or ()) if m in EMBEDDINGS}
                                 | {m.rsplit(".", 1)[-1] for m in embedded})

    @staticmethod
    def _adapted(config: LoraConfig, ranks: dict[str, int], model_type: str | None) -> list[str] | None:
        """Last name component of every adapted module; None when unknown (a regex, or all-linear: every linear
        layer but the output head)."""
        if ranks:
            return sorted({m.rsplit(".", 1)[-1] for m in ranks})
        targets = config.target_modules
        if targets is None:
            targets = DEFAULT_TARGETS.get(model_type or "")
        if isinstance(targets, list):
            return sorted({t.rsplit(".", 1)[-1] for t in targets})
        return None


def check(config: LoraConfig, targets: tuple[str, ...] | list[str] = TARGETS, *, facts: AdapterFacts | None = None,
          base_config: dict[str, Any] | None = None, max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK,
          base_gguf: str | None = None) -> list[Finding]:
    """Every finding for each of `targets` (see the module docstring for what each severity means); `base_gguf` is
    the GGUF file the adapter was trained on, when it was (then llama.cpp and Ollama can run that very file)."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ConfigError(f"unknown deployment target(s) {', '.join(map(repr, unknown))}; choose from "
                          f"{', '.join(TARGETS)}", where="deploy targets")
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise ConfigError(f"vLLM accepts only {', '.join(map(str, VLLM_MAX_LORA_RANKS))} as --max-lora-rank, got "
                          f"{max_lora_rank}", where="--max-lora-rank")
    adapter = _Adapter(config, facts, base_config, base_gguf)
    rules: dict[str, Callable[[_Adapter], list[Finding]]] = {
        "vllm": lambda a: _vllm(a, max_lora_rank), "llama.cpp": _llama_cpp, "ollama": _ollama, "peft": _peft}
    findings: list[Finding] = []
    for target in dict.fromkeys(targets):
        findings += rules[target](adapter)
    return findings


def _unknown_arch(target: str, what: str) -> Finding:
    return Finding(target, NOTE, f"base architecture unknown, so {what} was not checked",
                   "pass --base BASE_DIR (at train time: a local model.name_or_path)", "-")


# ---- vLLM -----------------------------------------------------------------------------------------------
def _vllm(a: _Adapter, max_lora_rank: int) -> list[Finding]:
    out: list[Finding] = []

    def add(severity: str, problem: str, fix: str, source: str = SRC_VLLM_HELPER) -> None:
        out.append(Finding("vllm", severity, problem, fix, source))

    if a.arch in VLLM_NO_LORA_ARCHS:
        add(REFUSED, f"vLLM's {a.arch} has no LoRA support ('{a.arch} does not support LoRA yet')",
            "train on a base whose vLLM model supports LoRA (Llama, Mistral, Qwen2, ...), or serve the merged model "
            "(lorakit export --format hf)", "vllm-project/vllm vllm/model_executor/models/gpt2.py, "
            "vllm/v1/worker/lora_model_runner_mixin.py")
    elif a.arch is None:
        out.append(_unknown_arch("vllm", "vLLM's per-model LoRA support"))
    elif a.arch not in VLLM_LORA_ARCHS:
        add(NOTE, f"lorakit does not know whether vLLM's {a.arch} supports LoRA",
            "look for the LoRA column of vLLM's supported-models list",
            "vllm-project/vllm docs/models/supported_models.md")
    if a.max_rank > max_lora_rank:
        bigger = [v for v in VLLM_MAX_LORA_RANKS if v >= a.max_rank]
        top = VLLM_MAX_LORA_RANKS[-1]
        server = (f", or start vLLM with --max-lora-rank {bigger[0]}" if bigger else
                  f", or to {top} or less with vLLM started with --max-lora-rank {top} (it accepts nothing larger)")
        add(REFUSED, f"LoRA rank {a.max_rank} is greater than max_lora_rank {max_lora_rank}"
            + (" (vLLM's default)" if max_lora_rank == VLLM_DEFAULT_MAX_LORA_RANK else ""),
            f"set lora.r and every lora.rank_pattern value to {max_lora_rank} or less{server}",
            "vllm-project/vllm vllm/config/lora.py (MaxLoRARanks, default 16), "
            "vllm/lora/peft_helper.py (validate_legal: the largest of r and rank_pattern)")
    if a.dora:
        add(REFUSED, "DoRA adapters are refused ('vLLM does not yet support DoRA.')",
            "set lora.use_dora: false, or serve the merged model (lorakit export --format hf)")
    if a.bias:
        add(REFUSED, "trained biases are refused ('Adapter bias is not supported.'; older releases needed "
            "--enable-lora-bias)", "set lora.bias: none",
            SRC_VLLM_HELPER + "; bias support removed in vllm-project/vllm#25807 (2025)")
    if [m for m in a.copies if m not in ("classifier", "score")]:
        # Recent releases allow ["classifier", "score"] (classification models) and nothing else.
        add(REFUSED, f"modules_to_save {a.copies} are refused ('vLLM only supports modules_to_save being None')",
            "remove lora.modules_to_save (to adapt lm_head or embed_tokens, list them in lora.target_modules on a "
            "Llama base), or serve the merged model (lorakit export --format hf)")
    if a.pissa:
        add(REFUSED, f"init_lora_weights={a.config.init_lora_weights!r} adapters are refused by recent releases "
            "(the weights apply to PiSSA's residual base, not the served one); older releases load them and compute "
            "the wrong model", "set lora.init_lora_weights: true (or gaussian), or serve the merged model")
    allowed = VLLM_LORA_ARCHS.get(a.arch or "")
    if a.embeddings and allowed is not None and [m for m in a.embeddings if m not in allowed]:
        add(REFUSED, f"LoRA on {', '.join(a.embeddings)} is refused for {a.arch} (its embedding_modules is empty: "
            "'expected target modules in ...')", "remove embed_tokens / lm_head from lora.target_modules",
            "vllm-project/vllm vllm/model_executor/models/" + {"MistralForCausalLM": "mistral.py",
                                                                "Qwen2ForCausalLM": "qwen2.py"}.get(a.arch, "llama.py")
            + ", vllm/lora/lora_model.py (check_unexpected_modules)")
    elif a.embeddings and allowed is None:
        add(NOTE, f"LoRA on {', '.join(a.embeddings)} loads only where the vLLM model lists it in embedding_modules",
            "check the base's vLLM model class, or remove them from lora.target_modules",
            "vllm-project/vllm vllm/lora/utils.py (get_supported_lora_modules)")
    for module, vocab in (a.facts.embedding_vocab() if a.facts else {}).items():
        if isinstance(a.vocab, int) and vocab != a.vocab:
            add(REFUSED, f"{module}: embedding LoRA over {vocab} tokens, the base has {a.vocab} ('The embedding "
                "LoRA size ... must be consistent with the base model's vocabulary size'; lora_extra_vocab_size is "
                "deprecated, to be removed in v0.12.0)", "train on the base as served, without resizing its vocabulary",
                "vllm-project/vllm vllm/lora/lora_model.py (from_lora_tensors), vllm/config/lora.py")
    if a.uneven_rank or a.config.alpha_pattern:
        add(MISHANDLED, "per-layer rank_pattern / alpha_pattern: vLLM releases whose PEFTHelper has no "
            "get_rank_and_scaling scale every layer by lora_alpha / r (newer ones read both patterns)",
            "use one lora.r and lora.lora_alpha for every layer (empty rank_pattern and alpha_pattern), or check your "
            "vLLM release", "vllm-project/vllm vllm/lora/peft_helper.py (get_rank_and_scaling; older versions: "
            "vllm_lora_scaling_factor = lora_alpha / r for all layers)")
    if a.config.use_rslora:
        add(NOTE, "rsLoRA (alpha / sqrt(r)) is applied since vllm-project/vllm#6909 (2024); older releases use "
            "alpha / r", "set lora.use_rslora: false if you serve an older vLLM",
            "vllm-project/vllm vllm/lora/peft_helper.py (__post_init__), PR #6909")
    return out


# ---- llama.cpp ------------------------------------------------------------------------------------------
def _gguf_archs() -> dict[str, str]:
    from .export.gguf import ARCHITECTURES  # lazily: the export package loads transformers

    return ARCHITECTURES


def _no_gguf_lora_form(a: _Adapter) -> list[tuple[str, str]]:
    """(what, lora field fix) for the parts a GGUF LoRA file cannot hold: llama.cpp's converter exits on their
    tensors and lorakit's lora-gguf export refuses them by name."""
    parts = [("DoRA (use_dora)", "set lora.use_dora: false")] if a.dora else []
    if a.copies:
        parts.append((f"modules_to_save {a.copies}", "remove lora.modules_to_save"))
    if a.bias:
        parts.append(("trained biases (bias != none)", "set lora.bias: none"))
    return parts


def _scale_findings(target: str, route: str, exact: str, a: _Adapter, source: str) -> list[Finding]:
    """GGUF LoRA files carry one alpha and llama.cpp scales each layer by alpha / rank: rank_pattern survives,
    rsLoRA and alpha_pattern do not, unless each layer's scale is folded into B (lorakit's lora-gguf does)."""
    lost = [what for what, on in (("rsLoRA (use_rslora)", a.config.use_rslora),
                                  ("alpha_pattern", bool(a.config.alpha_pattern))) if on]
    if not lost:
        return []
    return [Finding(target, MISHANDLED, f"{' and '.join(lost)}: {route} writes one lora_alpha and llama.cpp scales "
                    "every layer by alpha / rank, so those layers get the wrong scale",
                    f"use {exact}, or set lora.use_rslora: false and empty lora.alpha_pattern", source)]


def _llama_cpp(a: _Adapter) -> list[Finding]:
    T = "llama.cpp"
    if a.arch is not None and a.arch not in _gguf_archs():
        supported = ", ".join(sorted(_gguf_archs()))
        return [Finding(T, REFUSED, f"lorakit's GGUF exports (lora-gguf, gguf) support {supported}; the base is "
                        f"{a.arch} (llama.cpp's own converters were not checked for it)",
                        "train on a base of one of those architectures, or export --format hf and convert with llama.cpp's "
                        "convert_hf_to_gguf.py yourself", SRC_LORAKIT_GGUF)]
    out = [] if a.arch else [_unknown_arch(T, "GGUF support")]
    for what, fix in _no_gguf_lora_form(a):
        out.append(Finding(T, NOTE, f"{what}: a GGUF LoRA file cannot hold it (convert_lora_to_gguf.py exits, "
                           "lorakit export --format lora-gguf refuses); the merged GGUF works",
                           f"{fix} to ship a separate adapter, or ship the merged model: lorakit export --format gguf",
                           f"{SRC_LLAMACPP_CONVERT}; {SRC_LORAKIT_GGUF}"))
    if a.embeddings and "embed_tokens" in a.embeddings:
        out.append(Finding(T, NOTE, "LoRA on embed_tokens: lorakit export --format lora-gguf refuses embedding "
                           "adapters (llama.cpp's convert_lora_to_gguf.py converts them)",
                           "convert with convert_lora_to_gguf.py, or export --format gguf (merged)",
                           "lorakit src/lorakit/export/lora_gguf.py; ggml-org/llama.cpp convert_lora_to_gguf.py "
                           "(get_base_tensor_name: lora_embedding_A/B)"))
    out += _scale_findings(T, "llama.cpp's convert_lora_to_gguf.py", "lorakit export --format lora-gguf (it folds "
                           "each layer's exact scale into B)", a, SRC_LLAMACPP_SCALE)
    if a.base_gguf:
        out.append(Finding(T, NOTE, f"trained on the GGUF file {a.base_gguf}: llama.cpp can run the adapter on that "
                           "very file, so it computes on the weights it was trained on (a merged export would "
                           "quantize them again)", f"lorakit export --format lora-gguf --out adapter.gguf, then "
                           f"llama-cli -m {a.base_gguf} --lora adapter.gguf (or llama-server)", SRC_LORAKIT_GGUF_BASE))
    return out


# ---- Ollama ---------------------------------------------------------------------------------------------
def _ollama(a: _Adapter) -> list[Finding]:
    T = "ollama"
    direct = a.arch is None or a.arch in OLLAMA_ADAPTER_ARCHS  # `ADAPTER <adapter dir>` converts it
    via_lorakit = a.arch is None or a.arch in _gguf_archs()  # export --format ollama / ADAPTER <lora-gguf file>
    if not direct and not via_lorakit:
        supported = ", ".join(sorted(_gguf_archs()))
        return [Finding(T, REFUSED, f"Ollama's ADAPTER import accepts bases of GGUF architecture llama or gemma2 "
                        f"and lorakit's Ollama export supports {supported}; the base is {a.arch}",
                        "train on a Llama or Mistral base (or Qwen2, through lorakit export --format ollama)",
                        f"{SRC_OLLAMA_CONVERT}; {SRC_LORAKIT_GGUF}")]
    out = [] if a.arch else [_unknown_arch(T, "Ollama's architecture rules")]
    if a.arch in OLLAMA_ENGINE_NO_LORA:
        out.append(Finding(T, NOTE, f"Ollama runs {OLLAMA_ENGINE_NO_LORA[a.arch]} models on its own engine, which "
                           "refuses every ADAPTER when the model loads ('loras are not yet implemented', after "
                           "`ollama create` accepted it): only a merged model runs there" +
                           (f"; for this GGUF base ({a.base_gguf}) lorakit export --format ollama writes the merged "
                            "model, quantized again from the dequantized weights" if a.base_gguf else ""),
                           "use lorakit export --format ollama (merged); lorakit verify shows what the quantization "
                           "costs", SRC_OLLAMA_ENGINE))
    elif a.base_gguf and via_lorakit:
        out.append(Finding(T, NOTE, f"trained on the GGUF file {a.base_gguf}: lorakit export --format ollama writes "
                           "FROM that file and ADAPTER adapter.gguf, so Ollama runs the weights the adapter was trained "
                           "on and nothing of the base is copied", "lorakit export --format ollama --out DIR, then "
                           "ollama create NAME -f DIR/Modelfile", SRC_LORAKIT_GGUF_BASE))
    # Each problem below refuses `ADAPTER <adapter dir>`; it becomes a note when lorakit's export gets around it.
    problems: list[tuple[str, str]] = []
    if not direct:
        problems.append((f"ADAPTER <adapter dir> refuses a {a.arch} base ('unsupported architecture')", "-"))
    alpha = a.config.lora_alpha
    if isinstance(alpha, float):  # json.dumps writes 16.0; Go cannot decode that into AdapterParameters' uint32
        problems.append((f"lora_alpha {alpha!r} is not written as an integer, and ADAPTER <adapter dir> reads it as "
                         "uint32 (json: cannot unmarshal number)", f"set lora.lora_alpha: {max(1, round(alpha))}"))
    for what, fix in _no_gguf_lora_form(a):
        problems.append((f"{what}: ADAPTER <adapter dir> passes those tensors through and llama.cpp rejects any "
                         "tensor that is not <name>.lora_a / .lora_b", fix))
    odd = [m for m in (a.modules or ()) if m not in OLLAMA_ADAPTER_MODULES]
    if odd and a.arch != "Gemma2ForCausalLM":
        problems.append((f"LoRA on {', '.join(odd)}: ADAPTER <adapter dir> names only q/k/v/o/gate/up/down_proj "
                         "for llama.cpp, which rejects the rest ('does not exist in base model')",
                         "keep lora.target_modules to q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"))
    for problem, fix in problems:
        if via_lorakit:
            out.append(Finding(T, NOTE, problem + "; lorakit export --format ollama (merged) works",
                               "use lorakit export --format ollama" + (f", or {fix}" if fix != "-" else ""),
                               f"{SRC_OLLAMA_LOAD}; {SRC_LORAKIT_GGUF}"))
        else:
            out.append(Finding(T, REFUSED, problem, fix if fix != "-" else "train on a supported base",
                               SRC_OLLAMA_LOAD))
    if direct:
        out += _scale_findings(T, "ADAPTER <adapter dir>", "lorakit export --format ollama (merged) or --format "
                               "lora-gguf (each layer's exact scale folded into B; then ADAPTER <file.gguf>)", a,
                               f"{SRC_OLLAMA_CONVERT} (AdapterParameters.KV); "
                               "ggml-org/llama.cpp src/llama-adapter.h (get_scale)")
    return out


# ---- PEFT -----------------------------------------------------------------------------------------------
def _peft(a: _Adapter) -> list[Finding]:
    # lorakit writes every LoraConfig field plus lora_bias (lora/io.py peft_config_dict). PEFT releases before
    # huggingface/peft#2038 (Aug 2024) pass every key to LoraConfig(**kwargs) and raise on one they lack; lora_bias
    # came later (huggingface/peft#2237, Nov 2024), so those releases refuse every adapter lorakit writes, whatever
    # its options. Later releases drop unknown keys with a warning (src/peft/config.py).
    if a.facts is not None and "lora_bias" not in a.facts.config_keys:
        return []
    return [Finding("peft", NOTE, "adapter_config.json has lora_bias (and every other LoraConfig field); PEFT "
                    "releases from before huggingface/peft#2038 (merged Aug 2024) fail on it with "
                    "'LoraConfig.__init__() got an unexpected keyword argument'",
                    "nothing in lora: to change; read it with a PEFT release from after August 2024",
                    "huggingface/peft src/peft/config.py (_check_and_remove_unused_kwargs, #2038), #2237")]


# ---- run configs ----------------------------------------------------------------------------------------
def base_config_of(name_or_path: str | Path) -> dict[str, Any] | None:
    """The config.json of a local model directory, or transformers' config of a local GGUF file; None for a hub
    id (nothing is downloaded) or no readable file."""
    if str(name_or_path).lower().endswith(".gguf") and Path(name_or_path).is_file():
        return _gguf_config(Path(name_or_path))
    path = Path(name_or_path) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _gguf_config(path: Path) -> dict[str, Any] | None:
    from .gguf_base import hf_config_of

    try:
        return hf_config_of(path).to_dict()
    except Exception:  # not readable as a model GGUF: the checks go on without the base's facts, as for a hub id
        return None


def check_run_config(config: Any, log: Callable[[str], None]) -> list[Finding]:
    """Check the run's lora section(s) against `deploy_targets` before any model loads: refused stops the run
    with a ConfigError naming target, problem and fix; mishandled and notes are logged.

    `config` is a lorakit.config.RunConfig, not imported here (not even for typing): config imports TARGETS
    from this module to validate deploy_targets, and the dependency points that way only."""
    targets = list(config.deploy_targets or [])
    if not targets:
        return []
    base = base_config_of(config.model.name_or_path)
    name = str(config.model.name_or_path)
    base_gguf = name if name.lower().endswith(".gguf") else config.model.gguf_file  # trained on a GGUF file
    # tasks with their own lora section train several adapters
    sections = [("lora", config.lora)] + [(f"tasks {t.name!r} lora", t.lora) for t in config.tasks if t.lora is not None]
    findings, refused = [], []
    for where, lora in sections:
        for finding in check(lora, targets, base_config=base, base_gguf=base_gguf):
            findings.append(finding)
            if finding.severity == REFUSED:
                refused.append(f"{finding.target} would refuse the adapter ({where}): {finding.problem}; fix: "
                               f"{finding.fix} [{finding.source}]")
            else:
                log(f"deploy check ({where}): {finding.line()}")
    if refused:
        refused.append("to train anyway, remove the target from deploy_targets")
        raise ConfigError(refused, where="run config (deploy_targets)")
    return findings
