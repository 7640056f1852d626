"""Phi-3-mini-4k-instruct with LLaMA-Factory's `phi` template (the paper's trainer; `mwjax.finetune.data`) and one
adapter per HF fused module (`qkv_proj`, `gate_up_proj`: `LoraConfig(fuse=True)`), as LLaMA-Factory's
LoRA on HF Phi-3 has; the PEFT export loads on HF Phi-3.
`--config=phi3_mini` (LoRA + MacDrop) or `--config=phi3_mini:<variant>`, variant one of
lora, lora_macdrop, dora, dora_macdrop."""

from mwjax.experiments.configs.base import paper_run


def get_config(variant: str = "lora_macdrop"):
    """The Table 7 run of Phi-3-mini-4k-instruct: the phi template, one adapter per HF fused module.

    Args:
      variant: lora, lora_macdrop, dora or dora_macdrop, from `--config=phi3_mini:<variant>`.

    Returns:
      The run's ConfigDict (`base.paper_run`).
    """
    c = paper_run(variant, name="phi3_mini", model="microsoft/Phi-3-mini-4k-instruct", template="phi")
    c.lora.fuse = True
    return c
