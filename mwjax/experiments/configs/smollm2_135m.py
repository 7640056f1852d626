"""SmolLM2-135M-Instruct (embedded, from PyPI) on the embedded synthetic tasks: a complete MacDrop
run in a few CPU minutes (`python -m experiments.macdrop --config=smollm2_135m`). Variants as the
paper configs (`--config=smollm2_135m:dora`)."""

from mwjax.experiments.configs.base import paper_run


def get_config(variant: str = "lora_macdrop"):
    """The CPU recipe: SmolLM2-135M (embedded) in float32, LoRA r 8, on 600 synthetic records, one epoch.

    Args:
      variant: lora, lora_macdrop, dora or dora_macdrop, from `--config=smollm2_135m:<variant>`.

    Returns:
      The run's ConfigDict (`base.paper_run`).
    """
    c = paper_run(variant, name="smollm2_135m", model="embedded:smollm2", template="tokenizer")
    c.dtype = c.param_dtype = "float32"  # CPUs have no fast bfloat16
    c.data.update({"source": "synthetic", "num_synthetic": 600, "cutoff_len": 96, "val_size": 64})
    c.lora.update({"rank": 8, "alpha": 16.0})
    c.train.update({"learning_rate": 1e-3, "epochs": 1.0, "micro_batch_size": 8, "grad_accum": 2, "remat": None,
                    "warmup_ratio": 0.05, "log_every": 1, "eval_every": 10, "save_every": 10})
    return c
