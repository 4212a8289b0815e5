"""`lorakit quickstart`: the whole workflow on a model and dataset shipped with the package, offline.

The base model (1.3M parameters, pre-trained by scripts/make_quickstart_assets.py on a small synthetic
world) answers questions about animals in prose; it has never seen JSON. The quickstart teaches it, with
a LoRA adapter (r=16 on every linear layer, 1000 steps), to turn a sentence about an animal into a
one-line JSON record, shows the validation loss falling and the same held-out prompts answered before
and after (0/5 exact before, 5/5 after, in about two minutes on 2 CPU cores), then merges and saves.
"""

from .run import ASSETS, QuickstartResult, quickstart_config, run_quickstart

__all__ = ["ASSETS", "QuickstartResult", "quickstart_config", "run_quickstart"]
