"""llama.cpp (through llama-cpp-python) run in a child process, so that a crash there is a failed test rather than
a dead test run: the logits of a token sequence and the token ids of some texts, optionally with a GGUF LoRA."""

from __future__ import annotations

import numpy as np

LLAMA_CPP_SCRIPT = """
import json, sys
import numpy as np
from llama_cpp import Llama
model_file, out, ids, texts, lora = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
llm = Llama(model_file, logits_all=True, verbose=False, n_ctx=128, n_threads=1, lora_path=lora or None)
tokens = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts]
llm.eval(ids)
np.save(out, np.array(llm.scores[:len(ids)], dtype=np.float32))
print(json.dumps(tokens))
llm.close()
"""
TEXTS = ["The quick brown fox", "Héllo wörld, 你好 世界!", "def f(x): return x * 2  # 456", "<|im_start|>user"]


def run_llama_cpp(model_file, ids, tmp_path, lora=None, texts=TEXTS):
    """Logits (len(ids), vocab) and token ids of TEXTS from llama.cpp, in a child process (a crash there is
    a failed test, not a dead test run)."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", LLAMA_CPP_SCRIPT, str(model_file), str(tmp_path / "logits.npy"),
                           json.dumps(ids), json.dumps(texts), str(lora or "")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    return np.load(tmp_path / "logits.npy"), json.loads(done.stdout.strip().splitlines()[-1])
