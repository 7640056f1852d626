"""Fused LoRA / DoRA on Phi-3 (`LoraConfig(fuse=True)`) against HF PEFT on HF Phi-3's `qkv_proj` /
`gate_up_proj`: one shared A per fused module, B and DoRA's magnitude split by rows; same logits, loss and
gradients; PEFT export / import both ways; orbax round trip; merge; the MacDrop mask; the refusals."""

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
from mwjax.research.massive import MassiveWeights  # noqa: E402

TOKENS = random_tokens(48, seed=41)
HF_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # every linear layer of HF Phi-3
FUSED = peft.LoraConfig(rank=4, alpha=8.0, fuse=True)
# tiny phi3: 4 heads x 16 + 2 kv heads x 16 x 2 = 128 rows of qkv_proj; 2 x 96 rows of gate_up_proj
QKV_ROWS, GATE_UP_ROWS = (64, 32, 32), (96, 96)


@pytest.fixture(scope="module")
def base(hf_checkpoint):
    hf, path = hf_checkpoint("phi3")
    model, _ = converters.load(path, tokenizer=False)
    return hf, model


def hf_clone(hf):
    clone = type(hf)(hf.config).eval()
    clone.load_state_dict(hf.state_dict())
    return clone


def member_paths(ours) -> dict[str, tuple[str, ...]]:
    """HF module path -> the paths of the mwjax adapters it holds, in its row order (a lone module: itself)."""
    layers = peft.adapters(ours)
    fused = peft.fused_groups(ours, list(layers))
    grouped = {m for members in fused.values() for m in members}
    return fused | {p: (p,) for p in layers if p not in grouped}


def groups(ours) -> dict[str, list]:
    """HF module path -> the mwjax adapters it holds, in its row order."""
    layers = peft.adapters(ours)
    return {hf: [layers[m] for m in members] for hf, members in member_paths(ours).items()}


def fused_pair(hf, model, *, dora, seed=0):
    """(PEFT model on HF Phi-3's fused modules, mwjax model with fused adapters) holding the same
    non-trivial weights: A shared, B != 0, DoRA's magnitude moved off its initial norm."""
    ours = peft.add_adapters(model, peft.LoraConfig(rank=4, alpha=8.0, dora=dora, fuse=True), seed=seed)
    theirs = peft_lib.get_peft_model(hf_clone(hf), peft_lib.LoraConfig(
        r=4, lora_alpha=8, target_modules=HF_TARGETS, use_dora=dora, lora_dropout=0.0)).eval()
    rng = np.random.default_rng(seed)
    for path, layers in groups(ours).items():
        module = theirs.base_model.model.get_submodule(path)
        rows = np.cumsum([0] + [layer.out_features for layer in layers])
        a = np.asarray(layers[0].lora_a[...])  # [in, r], the one A of the group
        b = rng.normal(0, 0.05, size=(4, rows[-1])).astype(np.float32)  # [r, fused out]
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(torch.from_numpy(a.T.copy()))
            module.lora_B["default"].weight.copy_(torch.from_numpy(b.T.copy()))
            if dora:  # PEFT's initial magnitude (norm of the fused rows) is ours side by side
                magnitude = module.lora_magnitude_vector["default"].weight
                ours_init = np.concatenate([np.asarray(layer.lora_magnitude[...]) for layer in layers])
                assert_close_to_scale(ours_init, magnitude.numpy(), 1e-6, what=f"{path} initial magnitude")
                mag = magnitude.numpy() * (1 + rng.normal(0, 0.1, size=magnitude.shape)).astype(np.float32)
                magnitude.copy_(torch.from_numpy(mag))
        for layer, start, stop in zip(layers, rows[:-1], rows[1:], strict=True):
            layer.lora_b[...] = jnp.asarray(b[:, start:stop])
            if dora:
                layer.lora_magnitude[...] = jnp.asarray(mag[start:stop])
    return theirs, ours


def test_fused_modules_share_one_a(base):
    hf, model = base
    ours = peft.add_adapters(model, FUSED)
    attn, mlp = ours.model.layers[1].self_attn, ours.model.layers[1].mlp
    assert attn.q_proj.lora_a is attn.k_proj.lora_a is attn.v_proj.lora_a
    assert mlp.gate_proj.lora_a is mlp.up_proj.lora_a and mlp.up_proj.lora_a is not attn.q_proj.lora_a
    assert attn.o_proj.lora_a is not attn.q_proj.lora_a
    assert [attn.q_proj.lora_b[...].shape[1], attn.k_proj.lora_b[...].shape[1],
            attn.v_proj.lora_b[...].shape[1]] == list(QKV_ROWS)
    # the trainable state holds each shared A once: as many parameters as PEFT trains on HF Phi-3
    leaves = jax.tree.leaves(nnx.state(ours, peft.LoRAParam))
    theirs = peft_lib.get_peft_model(hf_clone(hf), peft_lib.LoraConfig(r=4, lora_alpha=8, target_modules=HF_TARGETS))
    assert sum(x.size for x in leaves) == theirs.get_nb_trainable_parameters()[0]
    names = [p[-1] for p, _ in nnx.to_flat_state(nnx.state(ours, peft.LoRAParam))]
    assert names.count("lora_a") == 3 * 4 and names.count("lora_b") == 3 * 7  # 4 PEFT modules, 7 projections
    # B = 0 at init: the adapted model computes what the base model computes
    np.testing.assert_array_equal(models.forward(ours, jnp.asarray(TOKENS)), models.forward(model, jnp.asarray(TOKENS)))
    # unfused adapters keep separate A's (today's default)
    plain = peft.add_adapters(model, peft.LoraConfig(rank=4, alpha=8.0))
    assert plain.model.layers[0].self_attn.q_proj.lora_a is not plain.model.layers[0].self_attn.k_proj.lora_a


@pytest.mark.parametrize("dora", [False, True])
def test_forward_loss_and_gradients_match_peft(base, dora):
    hf, model = base
    theirs, ours = fused_pair(hf, model, dora=dora)
    assert_logits_close(models.forward(ours, jnp.asarray(TOKENS)), hf_logits(theirs, TOKENS))
    loss = loss_torch(theirs, TOKENS)
    loss.backward()
    graphdef, trainable, rest = nnx.split(ours, peft.LoRAParam, ...)
    value, grads = jax.value_and_grad(lambda t: loss_ours(nnx.merge(graphdef, t, rest), TOKENS))(trainable)
    np.testing.assert_allclose(float(value), loss.item(), rtol=1e-5)
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    for path, members in member_paths(ours).items():
        module = theirs.base_model.model.get_submodule(path)
        a_grads = [flat[f"{m}.lora_a"] for m in members if f"{m}.lora_a" in flat]
        assert len(a_grads) == 1, f"{path}: the shared A appears {len(a_grads)} times among the gradients"
        pairs = [("lora_A", a_grads[0], module.lora_A["default"].weight.grad.numpy().T),
                 ("lora_B", np.concatenate([flat[f"{m}.lora_b"] for m in members], axis=1),
                  module.lora_B["default"].weight.grad.numpy().T)]
        if dora:
            pairs.append(("magnitude", np.concatenate([flat[f"{m}.lora_magnitude"] for m in members]),
                          module.lora_magnitude_vector["default"].weight.grad.numpy()))
        for name, got, ref in pairs:
            # the fused A's gradient sums over q, k and v (gate and up): a missing use is far off 1e-5 of scale
            assert_close_to_scale(got, ref, 1e-5, rtol=2e-4, what=f"{path}.{name}")


@pytest.mark.parametrize("dora", [False, True])
def test_export_loads_in_hf_peft(base, dora, tmp_path):
    from safetensors.numpy import load_file

    hf, model = base
    _, ours = fused_pair(hf, model, dora=dora, seed=7)
    peft.export_peft(ours, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.2"
    assert tensors[f"{prefix}.self_attn.qkv_proj.lora_A.weight"].shape == (4, 64)
    assert tensors[f"{prefix}.self_attn.qkv_proj.lora_B.weight"].shape == (sum(QKV_ROWS), 4)
    assert tensors[f"{prefix}.mlp.gate_up_proj.lora_B.weight"].shape == (sum(GATE_UP_ROWS), 4)
    np.testing.assert_array_equal(tensors[f"{prefix}.self_attn.qkv_proj.lora_B.weight"][64:96],
                                  np.asarray(ours.model.layers[2].self_attn.k_proj.lora_b[...]).T)  # k after q
    assert not any(".q_proj." in k or ".up_proj." in k for k in tensors)
    if dora:
        np.testing.assert_array_equal(tensors[f"{prefix}.mlp.gate_up_proj.lora_magnitude_vector"][96:],
                                      np.asarray(ours.model.layers[2].mlp.up_proj.lora_magnitude[...]))
    loaded = peft_lib.PeftModel.from_pretrained(hf_clone(hf), str(tmp_path)).eval()
    assert_logits_close(models.forward(ours, jnp.asarray(TOKENS)), hf_logits(loaded, TOKENS))
    # and back: load_peft splits the fused tensors into the same adapters
    back = peft.load_peft(model, tmp_path)
    mlp = back.model.layers[0].mlp
    assert back.lora_config.fuse and mlp.gate_proj.lora_a is mlp.up_proj.lora_a
    np.testing.assert_array_equal(models.forward(back, jnp.asarray(TOKENS)), models.forward(ours, jnp.asarray(TOKENS)))


@pytest.mark.parametrize("dora", [False, True])
def test_adapters_saved_by_hf_peft_load(base, dora, tmp_path):
    hf, model = base
    theirs, ours = fused_pair(hf, model, dora=dora, seed=9)
    theirs.save_pretrained(str(tmp_path))
    loaded = peft.load_adapters(model, tmp_path)  # dispatches to load_peft
    assert loaded.lora_config.fuse and loaded.lora_config.dora == dora
    attn = loaded.model.layers[1].self_attn
    assert attn.q_proj.lora_a is attn.k_proj.lora_a is attn.v_proj.lora_a
    assert_logits_close(models.forward(loaded, jnp.asarray(TOKENS)), hf_logits(theirs, TOKENS))


def test_peft_dropout_on_fused_modules_is_dropped_with_a_warning(base, tmp_path):
    """PEFT's dropout only acts in training: a fused adapter trained with it loads (computing PEFT's eval
    output) with dropout 0, and says so."""
    import json

    hf, model = base
    theirs, _ = fused_pair(hf, model, dora=False, seed=13)
    theirs.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"lora_dropout": 0.1}))
    with pytest.warns(UserWarning, match="LoRA dropout 0.1 dropped: mwjax's fused adapters carry none"):
        loaded = peft.load_peft(model, tmp_path)
    assert loaded.lora_config.fuse and loaded.lora_config.dropout == 0.0
    assert_logits_close(models.forward(loaded, jnp.asarray(TOKENS)), hf_logits(theirs, TOKENS))


@pytest.mark.parametrize("dora", [False, True])
def test_orbax_round_trip_and_merge(base, dora, tmp_path):
    hf, model = base
    _, ours = fused_pair(hf, model, dora=dora, seed=5)
    expected = models.forward(ours, jnp.asarray(TOKENS))
    peft.save_adapters(ours, tmp_path)
    restored = peft.load_adapters(model, tmp_path)
    assert restored.lora_config.fuse and restored.lora_config.dora == dora
    mlp = restored.model.layers[2].mlp
    assert mlp.gate_proj.lora_a is mlp.up_proj.lora_a  # restored shared, not as two copies
    np.testing.assert_array_equal(models.forward(restored, jnp.asarray(TOKENS)), expected)
    merged = peft.merge(ours)
    assert not peft.adapters(merged)
    assert_logits_close(models.forward(merged, jnp.asarray(TOKENS)), expected, rel=1e-5)
    if not dora:  # W_k + s A B_k, with the group's one A
        layer = ours.model.layers[0].self_attn.k_proj
        want = layer.kernel[...] + 2.0 * ours.model.layers[0].self_attn.q_proj.lora_a[...] @ layer.lora_b[...]
        assert_close_to_scale(merged.model.layers[0].self_attn.k_proj.kernel[...], want, 1e-6)


def test_macdrop_mask_on_fused_gate_up(base):
    """The row mask multiplies gate and up rows of the base weight only; the reference is PEFT's DoRA on
    HF's gate_up_proj with those rows (gate row i and up row d_ff + i) edited."""
    hf, model = base
    theirs, ours = fused_pair(hf, model, dora=True, seed=3)
    rows = [4, 11, 60]
    values = jax.random.uniform(jax.random.key(1), (3, 64)) > 0.5
    mask = masks.RowMask(rows=jnp.asarray(rows), values=values.astype(jnp.float32))
    with torch.no_grad():
        weight = theirs.base_model.model.model.layers[1].mlp.gate_up_proj.base_layer.weight
        edit = torch.from_numpy(np.asarray(values, np.float32))
        weight[rows] *= edit
        weight[[96 + r for r in rows]] *= edit
    got = models.forward(ours, jnp.asarray(TOKENS), ffn_masks={1: mask})
    assert_logits_close(got, hf_logits(theirs, TOKENS))


def test_fused_refusals(base, hf_checkpoint, tmp_path):
    hf, model = base
    with pytest.raises(ValueError, match="dropout 0.05 with fuse=True.*set dropout=0"):
        peft.LoraConfig(fuse=True, dropout=0.05)
    with pytest.raises(ValueError, match=r"HF llama fuses none \(only \['phi3'\] do\): set fuse=False"):
        peft.add_adapters(converters.load(hf_checkpoint("llama_gqa")[1], tokenizer=False)[0], FUSED)
    only_q = peft.LoraConfig(fuse=True, targets=("*.self_attn.q_proj", "*.mlp.down_proj"))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.qkv_proj is one PEFT module over q_proj, k_proj, "
                                         r"v_proj, but the LoRA targets leave out \['model.layers.0.self_attn.k_proj'"):
        peft.select_targets(model, only_q)
    with pytest.raises(ValueError, match="leave out"):
        peft.add_adapters(model, peft.LoraConfig(fuse=True, targets=("*.mlp.up_proj",)))
    # whole groups are fine, fused or not
    whole = peft.add_adapters(model, peft.LoraConfig(fuse=True, targets=("*.self_attn.[qkv]_proj",)))
    assert len(peft.adapters(whole)) == 3 * 3
    peft.export_peft(whole, tmp_path / "attention")
    # separate adapters on q / k / v have no PEFT module on HF Phi-3
    with pytest.raises(ValueError, match=r"fuses model.layers.0.mlp.gate_proj .*LoraConfig\(fuse=True\)"):
        peft.export_peft(peft.add_adapters(model, peft.LoraConfig(rank=2)), tmp_path / "unfused")


def test_trainer_keeps_the_shared_a_and_its_export_loads_in_peft(base, tmp_path):
    """A few optimizer steps (remat'd layers, MacDrop on gate/up rows): the state holds each shared A once, the
    trained model still shares it, and its PEFT export computes the trained model's logits in HF PEFT."""
    from train_helpers import ArrayLoader

    from mwjax import macdrop
    from mwjax.core import sharding
    from mwjax.finetune import train

    hf, model = base
    _, ours = fused_pair(hf, model, dora=True, seed=11)
    tc = train.TrainConfig(learning_rate=5e-3, max_steps=2, micro_batch_size=2, grad_accum=2, remat="full")
    md = macdrop.MacDrop.from_massive_weights(MassiveWeights(layer=1, indices=(3, 9, 27), values=(1.0,) * 3,
                                                             median=0.1, token_id=1),
                                              3, 64, 96, macdrop.curriculum("step", 0.8, total_steps=2))
    a0 = np.array(ours.model.layers[0].self_attn.q_proj.lora_a[...])  # the step donates the initial buffers
    trainer = train.Trainer(ours, tc, steps=2, mesh=sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]), macdrop=md)
    state = trainer.initial_state
    assert sum(x.size for x in jax.tree.leaves(state.params)) == sum(
        x.size for x in jax.tree.leaves(nnx.state(ours, peft.LoRAParam)))
    stream = train.micro_batches(ArrayLoader(8, 2, 24, vocab=160), 0, 1e9)
    for _ in range(2):
        arrays = train.stack_step(stream, tc.grad_accum)
        state, _ = trainer.step_fn(state, trainer.frozen, trainer.place_batch(arrays, 1))
    tuned = trainer.model(state)
    attn = tuned.model.layers[0].self_attn
    assert attn.q_proj.lora_a is attn.k_proj.lora_a is attn.v_proj.lora_a
    assert not np.allclose(attn.q_proj.lora_a[...], a0)
    peft.export_peft(tuned, tmp_path)
    loaded = peft_lib.PeftModel.from_pretrained(hf_clone(hf), str(tmp_path)).eval()
    assert_logits_close(models.forward(tuned, jnp.asarray(TOKENS)), hf_logits(loaded, TOKENS))
