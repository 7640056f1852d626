"""Mistral-7B (Table 2):
`--config=mistral_7b` (LoRA + MacDrop) or `--config=mistral_7b:<variant>`, variant one of
lora, lora_macdrop, dora, dora_macdrop."""

from mwjax.experiments.configs.base import paper_run


def get_config(variant: str = "lora_macdrop"):
    return paper_run(variant, name="mistral_7b", model="mistralai/Mistral-7B-v0.1", template="mistral")
