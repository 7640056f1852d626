"""Mistral-7B (Table 2):
`--config=mistral_7b` (LoRA + MacDrop) or `--config=mistral_7b:<variant>`, variant one of
lora, lora_macdrop, dora, dora_macdrop."""

from mwjax.experiments.configs.base import paper_run


def get_config(variant: str = "lora_macdrop"):
    """The Table 2 run of Mistral-7B-v0.1 with the mistral template.

    Args:
      variant: lora, lora_macdrop, dora or dora_macdrop, from `--config=mistral_7b:<variant>`.

    Returns:
      The run's ConfigDict (`base.paper_run`).
    """
    return paper_run(variant, name="mistral_7b", model="mistralai/Mistral-7B-v0.1", template="mistral")
