"""An Ollama model directory: the GGUF file plus a Modelfile for `ollama create NAME -f DIR/Modelfile`; or, for
a base that is itself a GGUF file, the adapter alone as a GGUF LoRA with FROM that file and ADAPTER.

Ollama's TEMPLATE is a Go template, and a tokenizer's chat template is Jinja: no general translation
exists. So the chat template's family is recognised by the markers it writes and the matching Go template
is written, with the family's end-of-turn marker and the tokenizer's EOS as stop sequences. ChatML (Qwen and
many fine-tunes), Llama 3 and Mistral Instruct are the families so far, each tested by rendering both
templates; any other gets a Modelfile without TEMPLATE (Ollama then falls back to its own detection) and
a note saying so.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_directory
from .gguf import write_gguf
from .outputs import check_out

GO_TEMPLATES = {  # family -> (the marker its Jinja template writes, the Go template, stop sequences)
    "chatml": ("<|im_start|>",
               "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
               ["<|im_end|>"]),
    # Llama 3's Jinja template starts with bos_token; the runner adds BOS when it tokenizes the prompt (the
    # GGUF's tokenizer.ggml.add_bos_token, as Ollama's own Llama 3 templates assume), so it is left out here.
    "llama3": ("<|start_header_id|>",
               "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
               "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
               ["<|eot_id|>"]),
    # Mistral Instruct: [INST] user [/INST] answer</s> ..., no system role; BOS left to the runner as above.
    "mistral": ("[INST]",
                "{{- range .Messages }}{{- if eq .Role \"user\" }}[INST] {{ .Content }} [/INST]"
                "{{- else if eq .Role \"assistant\" }}{{ .Content }}</s>{{- end }}{{- end }}",
                ["[INST]", "</s>"]),
}


def chat_family(chat_template: str | None) -> str | None:
    """Which GO_TEMPLATES family a Jinja chat template belongs to, by the markers it writes; None if none."""
    if not chat_template:
        return None
    if "<<SYS>>" in chat_template:  # Llama 2's [INST] template folds a system prompt in: not Mistral's
        return None
    for family, (marker, _, _) in GO_TEMPLATES.items():
        if marker in chat_template:
            return family
    return None


def modelfile(gguf_name: str, model_dir: str | Path) -> tuple[str, str | None]:
    """(Modelfile text, note or None) for the GGUF file `gguf_name` beside it, from the merged model's tokenizer."""
    config = json.loads((Path(model_dir) / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = config.get("chat_template")
    if template is None and (Path(model_dir) / "chat_template.jinja").is_file():
        template = (Path(model_dir) / "chat_template.jinja").read_text(encoding="utf-8")
    eos = config.get("eos_token")
    return _modelfile([f"FROM ./{gguf_name}"], template, eos.get("content") if isinstance(eos, dict) else eos)


def adapter_modelfile(base_gguf: str | Path, adapter_name: str, tokenizer) -> tuple[str, str | None]:
    """(Modelfile text, note or None) applying the GGUF LoRA `adapter_name` beside it to the user's own GGUF
    file `base_gguf` (by absolute path: Ollama reads it from there when `ollama create` runs)."""
    lines = [f"FROM {Path(base_gguf).resolve()}", f"ADAPTER ./{adapter_name}"]
    return _modelfile(lines, getattr(tokenizer, "chat_template", None), getattr(tokenizer, "eos_token", None))


def _modelfile(lines: list[str], template, eos: str | None) -> tuple[str, str | None]:
    family = chat_family(template if isinstance(template, str) else None)
    note = None
    if family is None:
        note = ("the chat template is not one lorakit can write for Ollama yet (ChatML, Llama 3 and Mistral are); the "
                "Modelfile has no TEMPLATE, so Ollama picks one itself: check it with `ollama show --template`")
    else:
        _, go_template, stops = GO_TEMPLATES[family]
        lines.append(f'TEMPLATE """{go_template}"""')
        for stop in dict.fromkeys([*stops, *([eos] if eos else [])]):
            lines.append(f"PARAMETER stop {json.dumps(stop)}")
    return "\n".join(lines) + "\n", note


def write_ollama_directory(merged_dir: str | Path, out_dir: str | Path, *, quant: str = "f16",
                           name: str | None = None, overwrite: bool = False) -> str | None:
    """`out_dir` holding model.gguf and its Modelfile, written atomically from a merged model directory;
    returns the Modelfile note (None when a TEMPLATE was written). `overwrite` replaces only a directory
    holding nothing but a Modelfile and GGUF files (export/outputs.py)."""
    check_out(out_dir, "ollama", overwrite=overwrite)
    with atomic_directory(out_dir) as staging:
        write_gguf(merged_dir, staging / "model.gguf", quant=quant, name=name)
        text, note = modelfile("model.gguf", merged_dir)
        (staging / "Modelfile").write_text(text, encoding="utf-8")
        check_out(out_dir, "ollama", overwrite=overwrite)  # just before the replace
    return note


def write_ollama_adapter_directory(model, tokenizer, base_gguf: str | Path, out_dir: str | Path, *,
                                   overwrite: bool = False) -> str | None:
    """`out_dir` holding adapter.gguf (the adapter alone, export/lora_gguf.py) and a Modelfile with FROM the
    user's GGUF file and ADAPTER adapter.gguf: for a base that came from that file, so Ollama runs the weights
    the adapter was trained on, and nothing of the base is copied. Returns the Modelfile note, as above."""
    from .lora_gguf import write_lora_gguf

    check_out(out_dir, "ollama", overwrite=overwrite)
    with atomic_directory(out_dir) as staging:
        write_lora_gguf(model, staging / "adapter.gguf")
        text, note = adapter_modelfile(base_gguf, "adapter.gguf", tokenizer)
        (staging / "Modelfile").write_text(text, encoding="utf-8")
        check_out(out_dir, "ollama", overwrite=overwrite)  # just before the replace
    return note
