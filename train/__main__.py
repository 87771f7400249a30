"""`python -m train --config train/configs/NAME.yaml [--key value ...] [--resume]` (SPEC §3).

Any config key can be overridden: `--lr 1e-3`, `--init-from runs/tiny/model`, `--model.rope_parameters
'{rope_type: yarn, factor: 4}'`, `--lora true`. Values are read as YAML. Run several processes with
`accelerate launch [--multi_gpu|--use_fsdp] --num_processes N -m train ...`.
"""

import argparse
import sys

from .config import DEFAULTS, FLAGS, PRESETS, ConfigError, config_help, config_table, load_preset, parse_value
from .state import TrainingStateError


def parse_overrides(tokens: list[str]) -> dict:
    """`--key value`, `--key=value` and bare `--flag` (= true, for the keys that can be true) into {key: value}."""
    overrides, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}; overrides look like --key value")
        key, has_value, value = token[2:].partition("=")
        name = key.replace("-", "_")
        if not has_value:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value, i = tokens[i + 1], i + 1
            elif name in DEFAULTS and name not in FLAGS:
                example = f" (e.g. --{key} {DEFAULTS[name]})" if DEFAULTS[name] is not None else ""
                raise ConfigError(f"--{key} needs a value{example}; only true/false keys can be given bare")
            else:
                value = "true"
        overrides[name] = parse_value(value)
        i += 1
    return overrides


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets: {', '.join(PRESETS)}\nconfig keys, their defaults and meanings (train.config.TrainConfig):\n"
               f"{config_help()}\n  --model.FIELD, --lora.FIELD")
    parser.add_argument("--config", default="tiny", help="a preset name or a YAML file (default: tiny)")
    parser.add_argument("--print-config-table", action="store_true",
                        help="print the Markdown table of config keys (README \"Training and fine-tuning\") and exit")
    args, rest = parser.parse_known_args(argv)
    if args.print_config_table:
        print(config_table())
        return 0
    from .loop import NonFiniteLossError, run_training

    try:
        config = load_preset(args.config, parse_overrides(rest))
        model_dir = run_training(config)
    except (ConfigError, TrainingStateError, FileNotFoundError) as err:
        print(f"python -m train: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"python -m train: stopped: {err}", file=sys.stderr)
        return 3
    print(f"model: {model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
