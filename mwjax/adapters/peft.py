"""LoRA and DoRA adapters, computed as HF PEFT computes them (House of Cards fine-tunes with both): the API in one
name (`from mwjax import peft`).

    lora_model = peft.add_adapters(model, peft.LoraConfig(rank=16, alpha=16, dora=False))
    trainable = nnx.state(lora_model, peft.LoRAParam)          # only the adapters
    merged = peft.merge(lora_model)                            # plain model, adapters folded in
    peft.export_peft(lora_model, "adapter_dir")                 # HF PEFT `PeftModel.from_pretrained` loads it
    lora_model = peft.load_adapters(model, "adapter_dir")       # a PEFT dir, or one from peft.save_adapters

The pieces, one job each:

    adapters/lora.py         LoraConfig, LoRALinear (the LoRA / DoRA math on one Linear), LoRAParam
    adapters/targets.py      which layers get adapters, add_adapters, adapters, merge
    adapters/peft_io.py      HF PEFT directories: export_peft, load_peft
    adapters/checkpoints.py  orbax adapter checkpoints: save_adapters, load_adapters (either kind)
    adapters/errors.py       AdapterError and the check of every stored adapter tensor
"""

from mwjax.adapters.checkpoints import load_adapters, save_adapters
from mwjax.adapters.errors import AdapterError
from mwjax.adapters.lora import LoraConfig, LoRALinear, LoRAParam
from mwjax.adapters.peft_io import PEFT_FILES, export_peft, load_peft
from mwjax.adapters.targets import adapters, add_adapters, fused_groups, linear_paths, merge, select_targets

__all__ = ["PEFT_FILES", "AdapterError", "LoRALinear", "LoRAParam", "LoraConfig", "adapters", "add_adapters",
           "export_peft", "fused_groups", "linear_paths", "load_adapters", "load_peft", "merge", "save_adapters",
           "select_targets"]
