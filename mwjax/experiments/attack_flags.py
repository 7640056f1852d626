"""--attack / --attack_on / --label of the evaluation CLIs (experiments.zeroshot, experiments.longbench):
the model under evaluation, attacked as House of Cards Tables 1 and 8 do, and its row label in the tables."""

from __future__ import annotations

from absl import flags

from mwjax.core import lazy
from mwjax.experiments import common
from mwjax.research import defaults

# what needs jax (or matplotlib) loads after the flags are parsed: --help answers without it
attacks = lazy.module("mwjax.research.attacks")

FLAGS = flags.FLAGS
common.define_attack_flag("evaluation")
flags.DEFINE_enum("attack_on", "merged", list(defaults.ATTACK_ON), "with --adapter and --attack, Table 8's two "
                  "readings: merged (massive weights re-found on the merged model, its rows attacked) or base (found "
                  "before fine-tuning, the pretrained rows attacked under the live adapter; mwjax.attacks."
                  "after_fine_tuning)")
flags.DEFINE_string("label", None, "method label of this run in the tables (e.g. 'LoRA + MacDrop'; default "
                    "'original'); give an attacked run the same label as its unattacked twin")


def load_model():
    """--model with --adapter merged (or, with --attack too, attacked as --attack_on says) and --attack applied:
    (model, tokenizer)."""
    fine_tuned_attack = bool(FLAGS.attack and FLAGS.adapter)
    model, tokenizer = common.load_model(merge_adapter=not fine_tuned_attack)
    if fine_tuned_attack:
        model = attacks.after_fine_tuning(model, tokenizer, FLAGS.attack, FLAGS.adapter, FLAGS.attack_on,
                                          first_token=common.first_token_flag())
        print(f"{FLAGS.attack} on the fine-tuned model, attack_on={FLAGS.attack_on}")
        return model, tokenizer
    return common.apply_attack(model, tokenizer), tokenizer


def recorded() -> dict:
    """What a results JSON keeps about the model evaluated."""
    return {"model": FLAGS.model, "adapter": FLAGS.adapter, "attack": FLAGS.attack,
            "attack_on": FLAGS.attack_on if FLAGS.attack and FLAGS.adapter else None,
            "label": FLAGS.label or "original"}
