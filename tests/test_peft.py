"""LoRA / DoRA against HF PEFT on tiny models: same init copied over, same logits, loss and gradients;
the MacDrop row mask reaches the base weight only; merge and export round trips."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import (
    assert_close_to_scale,
    assert_logits_close,
    hf_logits,
    loss_ours,
    loss_torch,
    random_tokens,
    torch,
)

peft_lib = pytest.importorskip("peft")

from mwjax import converters, masks, models, peft  # noqa: E402

TOKENS = random_tokens(48, seed=40)


def peft_pair(hf, model, *, dora, targets=(), rslora=False, seed=0):
    """(PEFT model, mwjax model with adapters) holding the same non-trivial adapter weights."""
    config = peft.LoraConfig(rank=4, alpha=8.0, dora=dora, rslora=rslora, targets=targets)
    ours = peft.add_adapters(model, config, seed=seed)
    layers = peft.adapters(ours)
    clone = type(hf)(hf.config).eval()
    clone.load_state_dict(hf.state_dict())
    theirs = peft_lib.get_peft_model(clone, peft_lib.LoraConfig(
        r=4, lora_alpha=8, target_modules=sorted(layers), use_dora=dora, use_rslora=rslora, lora_dropout=0.0))
    theirs.eval()
    rng = np.random.default_rng(seed)
    for path, layer in layers.items():
        module = theirs.base_model.model.get_submodule(path)
        a = np.asarray(layer.lora_a[...])
        b = rng.normal(0, 0.05, size=layer.lora_b[...].shape).astype(np.float32)  # B != 0, so the adapter matters
        layer.lora_b[...] = jnp.asarray(b)
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(torch.from_numpy(a.T.copy()))
            module.lora_B["default"].weight.copy_(torch.from_numpy(b.T.copy()))
            if dora:
                magnitude = module.lora_magnitude_vector["default"].weight
                mag = magnitude.numpy() * (1 + rng.normal(0, 0.1, size=magnitude.shape)).astype(np.float32)
                magnitude.copy_(torch.from_numpy(mag))
                layer.lora_magnitude[...] = jnp.asarray(mag)
    return theirs, ours


@pytest.fixture(scope="module")
def base(hf_checkpoint):
    hf, path = hf_checkpoint("llama_gqa")
    model, _ = converters.load(path, tokenizer=False)
    return hf, model


@pytest.mark.parametrize("dora, rslora", [(False, False), (True, False), (False, True)])
def test_forward_loss_and_gradients_match_peft(base, dora, rslora):
    hf, model = base
    theirs, ours = peft_pair(hf, model, dora=dora, rslora=rslora)
    assert_logits_close(models.forward(ours, jnp.asarray(TOKENS)), hf_logits(theirs, TOKENS))
    loss = loss_torch(theirs, TOKENS)
    loss.backward()
    graphdef, trainable, rest = nnx.split(ours, peft.LoRAParam, ...)
    value, grads = jax.value_and_grad(lambda t: loss_ours(nnx.merge(graphdef, t, rest), TOKENS))(trainable)
    np.testing.assert_allclose(float(value), loss.item(), rtol=1e-5)
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    for path in peft.adapters(ours):
        module = theirs.base_model.model.get_submodule(path)
        pairs = [("lora_a", module.lora_A["default"].weight.grad.numpy().T),
                 ("lora_b", module.lora_B["default"].weight.grad.numpy().T)]
        if dora:
            pairs.append(("lora_magnitude", module.lora_magnitude_vector["default"].weight.grad.numpy()))
        for name, ref in pairs:
            got = flat[f"{path}.{name}"]
            # measured float32 noise: up to ~1.2e-6 of the gradient's scale; a wrong scaling or a
            # missing term moves the gradient by far more than 1e-5 of it
            assert_close_to_scale(got, ref, 1e-5, rtol=2e-4, what=f"{path}.{name}")


def test_only_adapters_are_trainable_and_base_is_shared(base):
    _, model = base
    ours = peft.add_adapters(model, peft.LoraConfig(rank=2, alpha=4.0))
    trainable = nnx.state(ours, peft.LoRAParam)
    names = {p[-1] for p, _ in nnx.to_flat_state(trainable)}
    assert names == {"lora_a", "lora_b"}
    paths = set(peft.adapters(ours))
    assert "lm_head" not in paths and len(paths) == 3 * 7  # every linear layer of 3 decoder layers
    # the base arrays are the original ones, not copies
    assert ours.model.layers[0].mlp.up_proj.kernel[...] is model.model.layers[0].mlp.up_proj.kernel[...]
    # B = 0 at init: the adapted model computes exactly what the base model computes
    np.testing.assert_array_equal(models.forward(ours, jnp.asarray(TOKENS)), models.forward(model, jnp.asarray(TOKENS)))


@pytest.mark.parametrize("dora", [False, True])
def test_macdrop_mask_reaches_only_the_base_weight(base, dora):
    """The row mask multiplies base rows; PEFT on a base model with those rows edited is the reference."""
    hf, model = base
    theirs, ours = peft_pair(hf, model, dora=dora, seed=3)
    rows = [4, 11, 60]
    values = jax.random.uniform(jax.random.key(0), (3, 64)) > 0.5
    mask = masks.RowMask(rows=jnp.asarray(rows), values=values.astype(jnp.float32))
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            weight = theirs.base_model.model.model.layers[1].mlp.get_submodule(name).base_layer.weight
            weight[rows] *= torch.from_numpy(np.asarray(values, np.float32))
    got = models.forward(ours, jnp.asarray(TOKENS), ffn_masks={1: mask})
    assert_logits_close(got, hf_logits(theirs, TOKENS))
    # adapters are untouched by the mask: the same mask on the merged model is different
    with pytest.raises(AssertionError):
        assert_logits_close(models.forward(peft.merge(ours), jnp.asarray(TOKENS), ffn_masks={1: mask}), got,
                            rel=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_pretrained_rows_attacked_under_a_live_adapter(base, dora):
    """House of Cards Table 8, read as zeroing the pretrained rows with the adapter unmerged: PEFT with those
    rows of base_layer.weight zeroed is the reference (for DoRA its norm then rescales the adapter's rows)."""
    from mwjax import attacks, massive

    hf, model = base
    theirs, ours = peft_pair(hf, model, dora=dora, seed=9)
    mw = massive.find_massive_weights(model, None, k=3, first_token=1)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            theirs.base_model.model.model.layers[mw.layer].mlp.get_submodule(name).base_layer.weight[
                list(mw.indices)] = 0
    got = models.forward(attacks.zero_top_k(ours, mw, 3), jnp.asarray(TOKENS))
    assert_logits_close(got, hf_logits(theirs, TOKENS))
    merged = models.forward(attacks.zero_top_k(peft.merge(ours), mw, 3), jnp.asarray(TOKENS))
    with pytest.raises(AssertionError):  # zeroing the merged rows (W0 + BA) is the other reading
        assert_logits_close(merged, got, rel=1e-5)
    with pytest.raises(ValueError, match="merge it"):
        attacks.restore_super_activation(ours, massive.SuperWeight(1, 2, 3, 0.5, 1.0, 1.0, 0))


@pytest.mark.parametrize("dora", [False, True])
def test_merge_folds_adapters(base, dora):
    hf, model = base
    _, ours = peft_pair(hf, model, dora=dora, seed=5)
    merged = peft.merge(ours)
    assert not peft.adapters(merged)
    assert_logits_close(models.forward(merged, jnp.asarray(TOKENS)), models.forward(ours, jnp.asarray(TOKENS)),
                        rel=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_export_loads_in_hf_peft(base, dora, tmp_path):
    hf, model = base
    _, ours = peft_pair(hf, model, dora=dora, seed=7)
    peft.export_peft(ours, tmp_path)
    clone = type(hf)(hf.config).eval()
    clone.load_state_dict(hf.state_dict())
    loaded = peft_lib.PeftModel.from_pretrained(clone, str(tmp_path)).eval()
    assert_logits_close(models.forward(ours, jnp.asarray(TOKENS)), hf_logits(loaded, TOKENS))


def test_export_is_what_peft_writes_and_auto_peft_loads_it(hf_checkpoint, tmp_path):
    """base_model_name_or_path resolvable, PEFT's short target names, peft_version, a model card: the adapter
    loads with AutoPeftModelForCausalLM alone."""
    hf, path = hf_checkpoint("llama_gqa")
    _, ours = peft_pair(hf, converters.load(path, tokenizer=False)[0], dora=True, seed=11)
    peft.export_peft(ours, tmp_path / "adapter", base_model_name_or_path=str(path))
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert written["peft_version"] == peft_lib.__version__
    assert f"base_model: {path}" in (tmp_path / "adapter" / "README.md").read_text()
    loaded = peft_lib.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"), dtype=torch.float32).eval()
    assert_logits_close(models.forward(ours, jnp.asarray(TOKENS)), hf_logits(loaded, TOKENS))
    # adapters on some layers only: short names would adapt every layer, so the full paths are written
    some = peft.add_adapters(converters.load(path, tokenizer=False)[0],
                             peft.LoraConfig(rank=2, alpha=4.0, targets=("model.layers.0.*",)))
    peft.export_peft(some, tmp_path / "some", base_model_name_or_path=str(path), gguf_file="model.gguf")
    written = json.loads((tmp_path / "some" / "adapter_config.json").read_text())
    assert written["target_modules"] == sorted(peft.adapters(some)) and len(written["target_modules"]) == 7
    assert 'gguf_file="model.gguf"' in (tmp_path / "some" / "README.md").read_text()


@pytest.mark.parametrize("dora", [False, True])
def test_adapters_saved_by_hf_peft_and_by_orbax_load_back(base, dora, tmp_path):
    hf, model = base
    theirs, ours = peft_pair(hf, model, dora=dora, seed=9)
    theirs.save_pretrained(str(tmp_path / "peft"))
    expected = models.forward(ours, jnp.asarray(TOKENS))
    assert_logits_close(models.forward(peft.load_adapters(model, tmp_path / "peft"), jnp.asarray(TOKENS)), expected)
    peft.save_adapters(ours, tmp_path / "orbax")
    restored = peft.load_adapters(model, tmp_path / "orbax")
    np.testing.assert_array_equal(models.forward(restored, jnp.asarray(TOKENS)), expected)
    assert restored.lora_config.dora == dora and not peft.adapters(model)
    with pytest.raises(FileNotFoundError, match="neither a PEFT adapter"):
        peft.load_adapters(model, tmp_path)


def test_dropout_only_in_training(base):
    _, model = base
    ours = peft.add_adapters(model, peft.LoraConfig(rank=2, alpha=4.0, dropout=0.5))
    for layer in peft.adapters(ours).values():
        layer.lora_b[...] = jnp.ones_like(layer.lora_b[...]) * 0.05
    tokens = jnp.asarray(TOKENS)
    ours.eval()
    a, b = ours(tokens), ours(tokens)
    np.testing.assert_array_equal(a, b)
    ours.train()
    c = ours(tokens)
    assert not np.allclose(c, a)


def test_bad_configs():
    for rank in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="rank must be an integer >= 1"):
            peft.LoraConfig(rank=rank)
    for alpha in (0.0, -4.0, float("nan"), float("inf"), "8"):
        with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
            peft.LoraConfig(alpha=alpha)
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\)"):
        peft.LoraConfig(dropout=1.0)


def test_target_patterns(base):
    _, model = base
    ours = peft.add_adapters(model, peft.LoraConfig(targets=("*.self_attn.q_proj", "*.mlp.down_proj")))
    assert sorted(peft.adapters(ours)) == sorted([f"model.layers.{i}.{m}" for i in range(3)
                                                  for m in ("self_attn.q_proj", "mlp.down_proj")])
    with pytest.raises(ValueError, match=r"patterns \['\*\.attn\.qq'\] match no linear layer"):
        peft.add_adapters(model, peft.LoraConfig(targets=("*.attn.qq",)))
    with pytest.raises(ValueError, match="already carries adapters"):
        peft.add_adapters(ours, peft.LoraConfig())
