"""The training and fine-tuning pipeline: `python -m train --config train/configs/NAME.yaml [--key value ...]`.

```python
from train import load_preset, run_training
config = load_preset("tiny")            # the embedded default; a dict of TrainConfig's keys, every one validated
config["out_dir"] = "runs/my-tiny"
model_dir = run_training(config)        # out_dir/model: AutoModelForCausalLM (trust_remote_code) + AutoTokenizer
```
"""

from .config import DEFAULTS, PRESETS, ConfigError, TrainConfig, apply_overrides, load_preset, resolve_config
from .loop import NonFiniteLossError, run_training

__all__ = ["DEFAULTS", "PRESETS", "ConfigError", "NonFiniteLossError", "TrainConfig", "apply_overrides", "load_preset",
           "resolve_config", "run_training"]
