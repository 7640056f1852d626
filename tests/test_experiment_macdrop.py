"""experiments.macdrop: config resolution, checks before compute, and the SmolLM2 run end to end."""

import json
import math
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from mwjax import peft
from mwjax.experiments import macdrop as experiment
from mwjax.experiments.configs import gemma2_2b, llama3_8b, phi3_mini, smollm2_135m
from mwjax.finetune import job, train


def test_bare_config_names_resolve():
    argv = experiment.resolve_config_argv(["prog", "--config=llama3_8b:dora", "--config.train.epochs=1"])
    assert argv[1] == f"--config={experiment.CONFIG_DIR / 'llama3_8b.py'}:dora" and argv[2] == "--config.train.epochs=1"
    with pytest.raises(SystemExit, match="no config named 'llama9'.*llama3_8b"):
        experiment.resolve_config_argv(["prog", "--config=llama9"])


def test_paper_configs_follow_table_5():
    c = llama3_8b.get_config("dora")
    assert c.lora.dora and not c.macdrop.enabled and c.name == "llama3_8b_dora"
    c = llama3_8b.get_config()
    assert (c.massive.k, c.macdrop.p0, c.macdrop.curriculum, c.lora.rank, c.lora.alpha) == (5, 0.8, "step", 16, 16.0)
    assert (c.train.learning_rate, c.train.epochs, c.train.warmup_ratio, c.data.val_size) == (1e-4, 3.0, 0.05, 0.05)
    assert c.train.micro_batch_size * c.train.grad_accum == 256  # sequences per optimizer step
    # Algorithm 1 wraps HF's training_step, called once per micro-batch: a fresh mask for each
    assert c.train.mask_every == "microbatch" == train.TrainConfig().mask_every
    with pytest.raises(ValueError, match="unknown variant"):
        llama3_8b.get_config("qlora")
    # LLaMA-Factory's own templates; Phi-3 adapted on its fused modules, as LLaMA-Factory does on HF Phi-3
    phi, gemma = phi3_mini.get_config("dora"), gemma2_2b.get_config()
    assert (phi.data.template, phi.lora.fuse, phi.lora.dora) == ("phi", True, True)
    assert (gemma.data.template, gemma.lora.fuse) == ("gemma", False) and not c.lora.fuse
    assert job.plan(phi).lora == peft.LoraConfig(rank=16, alpha=16.0, dora=True, fuse=True)


@pytest.mark.parametrize("field,value,message", [
    ("macdrop.p0", 1.5, r"p0 must lie in \[0, 1\]"),
    ("macdrop.scope", "rows", "unknown MacDrop scope 'rows'"),
    ("macdrop.curriculum", "linear", "unknown MacDrop curriculum 'linear'"),
    ("data.template", "vicuna", "unknown chat template"),
    ("train.decay", "step", "unknown learning-rate decay"),
    ("massive.k", 0, "massive.k must be >= 1"),
])
def test_bad_configs_fail_before_loading(field, value, message, monkeypatch):
    monkeypatch.setattr("mwjax.converters.load", lambda *a, **k: pytest.fail("loaded a model for a bad config"))
    with pytest.raises(ValueError, match=message):
        job.run(smollm2_with(field, value))


def numeric_fields(config, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted field, int or float) of every numeric field of a config, placeholders included."""
    out = []
    for key in config.keys():
        value = config[key]
        if hasattr(value, "keys"):
            out += numeric_fields(value, f"{prefix}{key}.")
        elif config.get_type(key) in (int, float):
            out.append((prefix + key, config.get_type(key)))
    return out


def test_every_numeric_config_field_is_range_checked():
    """NaN, inf and negative values of every numeric field are refused by plan (before anything loads) with an
    error naming the field; 0 is refused the same way or accepted (the mesh's -1 means the devices left)."""
    base = smollm2_135m.get_config()
    fields = numeric_fields(base)
    assert len(fields) >= 30
    problems = []
    for field, kind in fields:
        for value in ([-1, 0] if kind is int else [-1.0, 0.0, math.nan, math.inf]):
            config = smollm2_135m.get_config()
            section, _, name = field.rpartition(".")
            (config[section] if section else config)[name] = value
            try:
                job.plan(config)
            except ValueError as e:
                if name not in str(e):
                    problems.append(f"{field}={value}: the error does not name the field: {e}")
                continue
            if not (value == 0 or (field.startswith("mesh.") and value == -1)):
                problems.append(f"{field}={value} accepted")
    assert not problems, "\n".join(problems)


def smollm2_with(field: str, value):
    config = smollm2_135m.get_config()
    section, name = field.split(".")
    config[section][name] = value
    return config


@pytest.mark.parametrize("field,value,message", [
    ("massive.k", 10**6, "exceeds the model's d_ff=1536"),
    ("lora.targets", ("*.attn.qkv",), r"LoRA target patterns \['\*.attn.qkv'\] match no linear layer"),
])
def test_bad_configs_for_the_model_fail_before_compute(field, value, message, monkeypatch, tmp_path):
    monkeypatch.setattr("mwjax.research.massive.find_massive_weights", lambda *a, **k: pytest.fail("computed"))
    config = smollm2_with(field, value)
    config.output_dir = str(tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        job.run(config)


def test_missing_checkpoint_fails_fast(tmp_path):
    config = llama3_8b.get_config()
    config.model = str(tmp_path / "Meta-Llama-3-8B")
    config.output_dir = str(tmp_path / "run")  # the config's own (runs/...) is relative to the checkout
    with pytest.raises(FileNotFoundError, match="Meta-Llama-3-8B: no such file"):
        job.run(config)


@pytest.mark.slow
@pytest.mark.torch  # HF PEFT (which needs torch) loads the exported adapter
def test_smollm2_run_learns_and_exports_a_peft_adapter(tmp_path, smollm2_path):
    import peft as peft_lib
    import torch
    from hf_reference import gguf_parsed_once

    from mwjax import converters, models, peft

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.macdrop", "--config=smollm2_135m", f"--config.output_dir={out}",
           "--config.train.max_steps=3", "--config.train.micro_batch_size=4", "--config.train.grad_accum=1",
           "--config.data.val_size=16", "--config.data.num_synthetic=120", "--config.train.eval_every=0",
           f"--config.checkpoint_dir={tmp_path / 'ckpt'}"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "layer 12 (HF layers[11])" in run.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["massive_weights"]["indices"][:5] == [1229, 1487, 874, 926, 1010]
    assert results["eval_losses"][-1][1] < results["eval_loss_before"]
    assert (tmp_path / "ckpt" / "3").is_dir() and not (out / "checkpoints").exists()
    print(f"validation loss {results['eval_loss_before']:.4f} -> {results['eval_losses'][-1][1]:.4f}")

    base, _ = converters.load(smollm2_path, tokenizer=False)
    ours = peft.load_adapters(base, out / "adapter")
    ours_from_peft = peft.load_adapters(base, out / "adapter_peft")
    # the adapter names its base (the embedded model's GGUF directory): AutoPeft loads both, given the file
    written = json.loads((out / "adapter_peft" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(smollm2_path.parent.absolute())
    with gguf_parsed_once():
        hf = peft_lib.AutoPeftModelForCausalLM.from_pretrained(str(out / "adapter_peft"),
                                                               gguf_file=smollm2_path.name, dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, 49152, (1, 64))
    with torch.no_grad():
        theirs = hf(torch.as_tensor(tokens)).logits.numpy()
    logits = np.asarray(models.forward(ours, jnp.asarray(tokens)))
    np.testing.assert_allclose(logits, np.asarray(models.forward(ours_from_peft, jnp.asarray(tokens))), atol=1e-5)
    err = np.abs(logits - theirs).max()
    assert err <= 1e-4 * np.abs(theirs).max(), err


def test_a_field_added_by_a_newer_mwjax_at_its_default_is_not_a_change():
    """A run's config.json written before a field existed resumes, unless the new config moves it off its default."""
    new = json.loads(smollm2_135m.get_config().to_json())
    old = json.loads(json.dumps(new))
    del old["lora"]["fuse"], old["train"]["eps"]
    assert job.config_changes(old, new) == []
    new["lora"]["fuse"] = True
    assert job.config_changes(old, new) == ["lora.fuse: '<absent>' -> True"]


def test_help_lists_every_config_field_with_its_default():
    out = subprocess.run([sys.executable, "-m", "experiments.macdrop", "--help"], capture_output=True, text=True,
                         timeout=300)
    for line in ("train.learning_rate = 0.0001", "train.micro_batch_size = 64", "macdrop.p0 = 0.8", "lora.rank = 16"):
        assert f"\n  {line}\n" in out.stdout, line


@pytest.mark.parametrize("arg, expected", [("step", ("step", 0.8, 0.05)), ("exp,0.5", ("exp", 0.5, 0.05)),
                                           ("exp,0.5,0.1", ("exp", 0.5, 0.1))])
def test_ablation_curriculum_parts_left_out_take_their_own_defaults(arg, expected):
    """`exp,0.5` is p0 0.5 with exp's default alpha 0.05 (the parts were filled by position: alpha became 0.8)."""
    from mwjax.experiments.configs import ablation_curriculum

    c = ablation_curriculum.get_config(arg)
    assert (c.macdrop.curriculum, c.macdrop.p0, c.macdrop.alpha) == expected
