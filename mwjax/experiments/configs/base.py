"""The default MacDrop run: House of Cards' Table 5 recipe (LLaMA-Factory settings in comments).

Every field can be overridden on the command line, e.g. `--config.train.learning_rate=2e-4`,
`--config.macdrop.enabled=False`, `--config.model=/data/llama3-8b-orbax`.
"""

import dataclasses
import typing

from ml_collections import ConfigDict, config_dict

from mwjax.adapters.config import LoraConfig
from mwjax.finetune import data
from mwjax.finetune.config import TrainConfig

VARIANTS = ("lora", "lora_macdrop", "dora", "dora_macdrop")


def from_dataclass(instance) -> ConfigDict:
    """The fields of a config dataclass (`TrainConfig`, `LoraConfig`, `DataConfig`) as a ConfigDict.

    The library's defaults are the one source: a run config states only where it departs from them.

    Args:
      instance: the dataclass instance.

    Returns:
      A ConfigDict of its fields; a field that is None becomes a typed placeholder, so
      `--config.train.max_steps=100` can still set it.
    """
    hints = typing.get_type_hints(type(instance))
    fields = {}
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if value is None:
            value = config_dict.placeholder(next(t for t in typing.get_args(hints[field.name]) if t is not type(None)))
        fields[field.name] = value
    return ConfigDict(fields)


def get_config() -> ConfigDict:
    """The default MacDrop run, Table 5's recipe: LoRA r 16 + MacDrop (Step, p0 = 0.8, top-5 rows) on Llama-3-8B."""
    c = ConfigDict()
    c.name = "macdrop"
    c.model = "meta-llama/Meta-Llama-3-8B"  # HF dir, .gguf, mwjax orbax dir, embedded:<name> or hub id
    c.dtype = "bfloat16"  # compute dtype (bf16 compute, fp32 adapters and optimizer state)
    c.param_dtype = "bfloat16"  # storage of the frozen base
    c.first_token = config_dict.placeholder(str)  # token fed to find massive weights when there is no bos
    c.output_dir = config_dict.placeholder(str)  # default: runs/<name> (multi-host: a path every host shares)
    c.checkpoint_dir = config_dict.placeholder(str)  # default: <output_dir>/checkpoints; may be gs://bucket/run
    c.eval_before = True  # validation loss of the untouched model, to compare with the end
    c.resume = False  # continue the run in output_dir even though its config differs (else refused)
    c.overwrite_output_dir = False  # delete what an earlier run wrote to output_dir and start afresh
    # jax's persistent compilation cache (`compiled.keep_compiled_programs`): a relaunch loads its compiled step;
    # default $MWJAX_CACHE/xla (~/.cache/mwjax/xla); "" turns it off; JAX_COMPILATION_CACHE_DIR takes precedence
    c.compilation_cache_dir = config_dict.placeholder(str)

    # massive weights (Algorithm 1, lines 1-3): found with the bos token unless layer+indices are given
    c.massive = ConfigDict({"k": 5, "layer": config_dict.placeholder(int), "indices": config_dict.placeholder(tuple)})

    # LoRA / DoRA r 16, alpha 16 on every linear layer except embeddings and lm_head (lora_target: all): the
    # LoraConfig defaults (fuse: one adapter per HF fused module, Phi-3's qkv_proj / gate_up_proj)
    c.lora = from_dataclass(LoraConfig())

    # MacDrop: Step curriculum from p0 = 0.8 on the top-5 rows
    c.macdrop = ConfigDict({"enabled": True, "p0": 0.8, "curriculum": "step", "alpha": 0.05, "scope": "massive"})

    # alpaca_gpt4_en with the llama3 template (the DataConfig defaults: 5% validation, cutoff_len 1024)
    c.data = from_dataclass(data.DataConfig(source="llamafactory/alpaca_gpt4_en", template="llama3"))

    # the TrainConfig defaults (Table 5: lr 1e-4, 3 epochs, cosine, warmup 0.05, gradient_accumulation 4), and
    # 8 devices x per_device_train_batch_size 8 = 64 sequences per micro-batch; remat and logging for 8B scale
    c.train = from_dataclass(TrainConfig(micro_batch_size=64, remat="full", log_every=10, eval_every=100))

    # ("data", "fsdp", "tensor"); -1 takes the remaining devices
    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    return c


def paper_run(variant: str, *, name: str, model: str, template: str) -> ConfigDict:
    """One of Table 2's runs (Table 7's for the other models): `get_config` with the model, data template and variant.

    Args:
      variant: one of VARIANTS (LoRA or DoRA, with or without MacDrop); empty for lora_macdrop.
      name: the config's name; the run is named <name>_<variant>.
      model: the model to load (HF dir or hub id, .gguf, mwjax orbax dir, embedded:<name>).
      template: the data's chat template, as LLaMA-Factory names it (`mwjax.finetune.data`).

    Returns:
      The run's ConfigDict.

    Raises:
      ValueError: an unknown variant.
    """
    variant = variant or "lora_macdrop"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: use --config=<name>:<variant> with one of {VARIANTS}")
    c = get_config()
    c.name, c.model, c.data.template = f"{name}_{variant}", model, template
    c.lora.dora = variant.startswith("dora")
    c.macdrop.enabled = variant.endswith("macdrop")
    return c
