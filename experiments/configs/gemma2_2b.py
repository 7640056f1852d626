"""Gemma-2-2B with the tokenizer's chat template:
`--config=gemma2_2b` (LoRA + MacDrop) or `--config=gemma2_2b:<variant>`, variant one of
lora, lora_macdrop, dora, dora_macdrop."""

from experiments.configs.base import paper_run


def get_config(variant: str = "lora_macdrop"):
    return paper_run(variant, name="gemma2_2b", model="google/gemma-2-2b", template="tokenizer")
