"""Llama-3-8B (Table 2):
`--config=llama3_8b` (LoRA + MacDrop) or `--config=llama3_8b:<variant>`, variant one of
lora, lora_macdrop, dora, dora_macdrop."""

from mwjax.experiments.configs.base import paper_run


def get_config(variant: str = "lora_macdrop"):
    """The Table 2 run of Llama-3-8B with the llama3 template.

    Args:
      variant: lora, lora_macdrop, dora or dora_macdrop, from `--config=llama3_8b:<variant>`.

    Returns:
      The run's ConfigDict (`base.paper_run`).
    """
    return paper_run(variant, name="llama3_8b", model="meta-llama/Meta-Llama-3-8B", template="llama3")
