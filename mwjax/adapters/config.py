"""LoRA / DoRA hyper-parameters (HF PEFT's `LoraConfig`), in a module without jax: configs and command lines
(`experiments.macdrop --help` lists every field) read them before jax loads. The adapters are `adapters.lora`."""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapter hyper-parameters (HF PEFT `LoraConfig` names in comments).

    targets: glob patterns over module paths (e.g. "*.self_attn.q_proj"); () = every linear layer
      except embeddings and `lm_head` (LLaMA-Factory's "all"; for Mixtral that includes the router,
      unless `exclude_router`).
    fuse: one adapter per HF fused module (Phi-3's `qkv_proj`, `gate_up_proj`), as PEFT / LLaMA-Factory
      adapt HF Phi-3 (module doc); needed by `export_peft` for those projections. Targets must then take
      a fused module's projections all or none. Refused for families without fused HF modules (a flag
      that did nothing would let a config believe it matched a fused PEFT layout), and with dropout > 0:
      PEFT draws one dropout mask for the fused module's input, which separate adapters here do not share.
    """

    rank: int = 16  # r
    alpha: float = 16.0  # lora_alpha
    dropout: float = 0.0  # lora_dropout
    dora: bool = False  # use_dora
    rslora: bool = False  # use_rslora: scaling alpha / sqrt(r)
    targets: tuple[str, ...] = ()  # target_modules
    exclude_router: bool = False
    param_dtype: str = "float32"
    fuse: bool = False  # (no PEFT field: PEFT adapts whatever modules the HF model has)

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int | np.integer) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not _real(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        if not _real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must lie in [0, 1), got {self.dropout!r}")
        if self.fuse and self.dropout > 0:
            raise ValueError(f"LoRA dropout {self.dropout} with fuse=True: PEFT applies one dropout mask to a fused "
                             "module's input, which mwjax's separate q/k/v (gate/up) adapters cannot share; set "
                             "dropout=0 (LLaMA-Factory's default) or fuse=False")

    @property
    def scaling(self) -> float:
        """s, the factor of the adapter's update s (x A) B: alpha / r, or alpha / sqrt(r) under rsLoRA (PEFT's
        `scaling`)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def _real(x) -> bool:
    """A real number (an int or a float; a bool or a string is not)."""
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)
