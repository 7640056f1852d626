"""The default MacDrop run: House of Cards' Table 5 recipe (LLaMA-Factory settings in comments).

Every field can be overridden on the command line, e.g. `--config.train.learning_rate=2e-4`,
`--config.macdrop.enabled=False`, `--config.model=/data/llama3-8b-orbax`.
"""

from ml_collections import ConfigDict, config_dict

VARIANTS = ("lora", "lora_macdrop", "dora", "dora_macdrop")


def get_config() -> ConfigDict:
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

    # massive weights (Algorithm 1, lines 1-3): found with the bos token unless layer+indices are given
    c.massive = ConfigDict({"k": 5, "layer": config_dict.placeholder(int), "indices": config_dict.placeholder(tuple)})

    # LoRA / DoRA on every linear layer except embeddings and lm_head (lora_target: all); fuse: one adapter per
    # HF fused module (Phi-3's qkv_proj / gate_up_proj, as LLaMA-Factory adapts them), families with those only
    c.lora = ConfigDict({"rank": 16, "alpha": 16.0, "dropout": 0.0, "dora": False, "rslora": False,
                         "targets": (), "exclude_router": False, "fuse": False})

    # MacDrop: Step curriculum from p0 = 0.8 on the top-5 rows
    c.macdrop = ConfigDict({"enabled": True, "p0": 0.8, "curriculum": "step", "alpha": 0.05, "scope": "massive"})

    # alpaca_gpt4_en, 5% validation, cutoff_len 1024
    c.data = ConfigDict({"source": "llamafactory/alpaca_gpt4_en", "template": "llama3", "cutoff_len": 1024,
                         "val_size": 0.05, "seed": 42, "num_synthetic": 2000, "packing": False,
                         "max_examples": config_dict.placeholder(int)})

    # 8 devices x per_device_train_batch_size 8 = 64 sequences per micro-batch, x gradient_accumulation 4
    c.train = ConfigDict({
        "learning_rate": 1e-4, "epochs": 3.0, "max_steps": config_dict.placeholder(int), "warmup_ratio": 0.05,
        "decay": "cosine", "weight_decay": 0.0, "b1": 0.9, "b2": 0.999, "max_grad_norm": 1.0,
        "micro_batch_size": 64, "grad_accum": 4, "remat": "full", "mask_every": "microbatch", "seed": 42,
        "log_every": 10, "eval_every": 100, "eval_batches": config_dict.placeholder(int), "save_every": 100,
        "keep_checkpoints": 2, "divergence_factor": 4.0, "zero_grad_steps": 3,
    })

    # ("data", "fsdp", "tensor"); -1 takes the remaining devices
    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    return c


def paper_run(variant: str, *, name: str, model: str, template: str) -> ConfigDict:
    """One of Table 2's runs: `variant` in VARIANTS (LoRA or DoRA, with or without MacDrop)."""
    variant = variant or "lora_macdrop"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: use --config=<name>:<variant> with one of {VARIANTS}")
    c = get_config()
    c.name, c.model, c.data.template = f"{name}_{variant}", model, template
    c.lora.dora = variant.startswith("dora")
    c.macdrop.enabled = variant.endswith("macdrop")
    return c
