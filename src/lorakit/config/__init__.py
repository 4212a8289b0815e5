"""lorakit.config, the run config: one YAML file describes a run (model, adapter, data, training, output).

Typed dataclasses, validated once at the edge: every problem (unknown key, wrong type, missing
required field, value out of range) is collected and reported together with the field's dotted path
and what is expected, before any model loads. `--set train.lr=2e-4` style overrides are applied to
the raw mapping first, so they are validated exactly like the file.

sections.py holds the dataclasses, load.py reads and validates YAML, reference.py prints the field reference.
"""

from ..lora.config import LoraConfig
from .load import apply_override, as_trained, load_run_config, run_config_from_dict
from .reference import field_reference
from .sections import DataConfig, DistributedConfig, EvalConfig, ForgettingLimits, ModelConfig, PreferenceConfig, \
    QuantizationConfig, ReferenceConfig, RewardConfig, RLConfig, RunConfig, SpeedConfig, SweepConfig, TaskConfig, \
    TrainConfig

__all__ = ["DataConfig", "DistributedConfig", "EvalConfig", "ForgettingLimits", "LoraConfig", "ModelConfig",
           "PreferenceConfig", "QuantizationConfig", "ReferenceConfig", "RewardConfig", "RLConfig", "RunConfig",
           "SpeedConfig", "SweepConfig", "TaskConfig", "TrainConfig", "apply_override", "as_trained", "field_reference", "load_run_config",
           "run_config_from_dict"]
