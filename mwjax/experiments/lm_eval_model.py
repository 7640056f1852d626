"""The lm-evaluation-harness backend `mwjax`, loading what `--model_args` names.

    mwjax-lm-eval --model mwjax --model_args pretrained=PATH,adapter=DIR,dtype=bfloat16,attack=zero_top_k:5 \\
        --tasks arc_easy,arc_challenge,boolq,piqa,winogrande --batch_size 8

model_args: pretrained (anything `converters.load` reads), adapter (an HF PEFT directory or the orbax
adapter/ of experiments.macdrop, merged into the weights), attack (see `mwjax.research.attacks.from_spec`),
attack_on (with adapter and attack, House of Cards Table 8's reading: merged, the default, re-finds the
massive weights on the merged model and attacks its rows; base attacks the pretrained rows under the live
adapter; `mwjax.research.attacks.after_fine_tuning`), dtype (float32 | bfloat16), first_token (for finding massive
weights when the tokenizer has no bos), add_bos_token (True / False / unset = the tokenizer's default),
max_length, max_gen_toks, truncation (left, as lm-eval's HF backend, or middle: LongBench's cut of a prompt
over max_prompt_length tokens; `mwjax.eval.lm_eval.middle_truncate`), max_prompt_length.
From the shell: `mwjax-lm-eval` (installed with mwjax) is lm-eval's command line with this backend
registered (`experiments.lm_eval_cli`); in Python, import this module or pass an `MwjaxLM` instance.
"""

from __future__ import annotations

import jax.numpy as jnp
from lm_eval.api.registry import register_model
from lm_eval.utils import simple_parse_args_string

from mwjax import converters
from mwjax.adapters import peft
from mwjax.eval.lm_eval import MwjaxLM
from mwjax.research import attacks

LM_EVAL_ONLY = ("device", "max_batch_size")  # lm-eval passes these to every backend; they mean nothing here


@register_model("mwjax")
class MwjaxPretrainedLM(MwjaxLM):
    """The `mwjax` lm-eval backend: an `MwjaxLM` that loads its model from `--model_args` (module doc).

    Args:
      pretrained: the checkpoint: anything `converters.load` reads (HF dir, .gguf, orbax dir, embedded:<name>, hub id).
      dtype: compute and parameter dtype, "float32" or "bfloat16".
      attack: an attack spec (`mwjax.research.attacks.from_spec`, e.g. zero_top_k:5); checked before the model loads.
      adapter: an HF PEFT directory or experiments.macdrop's orbax adapter/, merged into the weights.
      first_token: token id or string to find the massive weights with when the tokenizer has no bos.
      batch_size: requests per forward pass; "auto" (lm-eval's) means 8.
      tokenizer: a tokenizer to use instead of the checkpoint's own (as lm-eval's HF backend).
      attack_on: with adapter and attack, Table 8's reading: "merged" or "base" (`attacks.after_fine_tuning`).
      kwargs: passed on to `MwjaxLM` (add_bos_token, max_length, max_gen_toks, truncation, max_prompt_length);
        lm-eval's device and max_batch_size are dropped.
    """

    def __init__(self, pretrained: str, dtype: str = "float32", attack: str | None = None, adapter: str | None = None,
                 first_token: int | str | None = None, batch_size: int | str = 8, tokenizer: str | None = None,
                 attack_on: str = "merged", **kwargs):
        for key in LM_EVAL_ONLY:
            kwargs.pop(key, None)
        if attack:
            attacks.parse_spec(attack)  # a bad spec fails before the model loads
        if attack_on not in attacks.ATTACK_ON:
            raise ValueError(f"attack_on={attack_on!r}: write one of {attacks.ATTACK_ON}")
        # tokenizer=PATH as lm-eval's HF backend: another tokenizer than the checkpoint's own
        model, tokenizer = converters.load(pretrained, dtype=jnp.dtype(dtype), tokenizer=tokenizer or True)
        if adapter and attack:
            model = attacks.after_fine_tuning(model, tokenizer, attack, adapter, attack_on, first_token=first_token)
        elif adapter:
            model = peft.merge(peft.load_adapters(model, adapter))
        elif attack:
            model = attacks.from_spec(model, tokenizer, attack, first_token=first_token)
        if batch_size == "auto" or str(batch_size).startswith("auto"):
            batch_size = 8
        super().__init__(model, tokenizer, batch_size=int(batch_size), **kwargs)
        self.description = {"pretrained": pretrained, "adapter": adapter, "dtype": dtype, "attack": attack,
                            "attack_on": attack_on if adapter and attack else None}

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """The backend from lm-eval's `--model_args` string; unlike lm-eval's own, a key in both wins from
        `additional_config` instead of failing (e.g. batch_size both in model_args and --batch_size).

        Args:
          arg_string: "key1=value1,key2=value2" (`--model_args`).
          additional_config: lm-eval's further settings (batch_size, device, ...); None values are left out.

        Returns:
          The `MwjaxPretrainedLM`.
        """
        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**(args | extra))
