"""Llama-2-13B; LLaMA-Factory's llama2 template is mistral's [INST] format without a system prompt:
`--config=llama2_13b` (LoRA + MacDrop) or `--config=llama2_13b:<variant>`, variant one of
lora, lora_macdrop, dora, dora_macdrop."""

from mwjax.experiments.configs.base import paper_run


def get_config(variant: str = "lora_macdrop"):
    """The Table 7 run of Llama-2-13B with the mistral template (LLaMA-Factory's llama2 is its [INST] format).

    Args:
      variant: lora, lora_macdrop, dora or dora_macdrop, from `--config=llama2_13b:<variant>`.

    Returns:
      The run's ConfigDict (`base.paper_run`).
    """
    return paper_run(variant, name="llama2_13b", model="meta-llama/Llama-2-13b-hf", template="mistral")
