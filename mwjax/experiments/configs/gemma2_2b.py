"""Gemma-2-2B with LLaMA-Factory's `gemma` template (the paper's trainer; `mwjax.finetune.data`):
`--config=gemma2_2b` (LoRA + MacDrop) or `--config=gemma2_2b:<variant>`, variant one of
lora, lora_macdrop, dora, dora_macdrop."""

from mwjax.experiments.configs.base import paper_run


def get_config(variant: str = "lora_macdrop"):
    """The Table 7 run of Gemma-2-2B (google/gemma-2-2b) with LLaMA-Factory's gemma template.

    Args:
      variant: lora, lora_macdrop, dora or dora_macdrop, from `--config=gemma2_2b:<variant>`.

    Returns:
      The run's ConfigDict (`base.paper_run`).
    """
    return paper_run(variant, name="gemma2_2b", model="google/gemma-2-2b", template="gemma")
