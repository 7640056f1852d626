"""research.prune: Wanda and magnitude pruning as functional masks, against the thesis' formula computed in torch the
way the Wanda repository applies it (layer by layer, forward hooks on every Linear), and what they remove of the
massive weights."""

import functools
import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import assert_logits_close, hf_logits, random_tokens, torch

from mwjax import converters, massive, probes, prune
from mwjax.research.massive import SuperWeight

CALIBRATION = random_tokens(24, batch=6, seed=3)  # [6, 24]
TOKENS = random_tokens(64, seed=4)


@pytest.fixture(scope="module")
def setup(hf_checkpoint):
    hf, path = hf_checkpoint("llama_gqa")
    model, _ = converters.load(path, tokenizer=False)
    return hf, model


def kernels(model):
    return {key: np.array(lin.kernel[...]) for key, lin in prune.prunable(model).items()}


def _record_input(inputs, name, module, args, out):
    inputs.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))  # [tokens, in]


def reference_wanda(hf, tokens, fraction=None, n_m=None):
    """Thesis Algorithm 1 (|W| * ||X_j||_2, sorted per output row) applied as the repository's `prune_wanda`: layer
    l's Linears see their inputs with layers < l already pruned (here: weights zeroed in a torch copy), then all of
    layer l is pruned. Returns (pruned torch copy, {(l, name): keep [out, in]}, {(l, name): ||X_j|| [in]})."""
    clone = type(hf)(hf.config).eval()
    clone.load_state_dict(hf.state_dict())
    keeps, norms = {}, {}
    for i, layer in enumerate(clone.model.layers):
        found = {name: mod for name, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)}
        inputs = {}
        hooks = [mod.register_forward_hook(functools.partial(_record_input, inputs, name))
                 for name, mod in found.items()]
        with torch.no_grad():
            clone(torch.tensor(tokens))
        for h in hooks:
            h.remove()
        for name, mod in found.items():
            norm = torch.cat(inputs[name]).double().norm(dim=0)  # ||X_j||_2 over all tokens
            w = mod.weight.data  # [out, in]
            metric = w.abs().double() * norm[None, :]
            keep = torch.ones_like(w, dtype=torch.bool)
            if n_m is None:
                pruned = torch.sort(metric, dim=1, stable=True).indices[:, :int(w.shape[1] * fraction)]
                keep.scatter_(1, pruned, False)
            else:
                n, m = n_m
                groups = metric.reshape(w.shape[0], -1, m)
                top = torch.topk(groups, n, dim=2).indices
                keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, top, True).reshape(w.shape)
            w[~keep] = 0
            keeps[(i, name)], norms[(i, name)] = keep.numpy(), norm.numpy()
    return clone, keeps, norms


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_wanda_matches_the_thesis_procedure(setup, sparsity):
    hf, model = setup
    before = kernels(model)
    parsed = prune.parse_sparsity(sparsity)
    masks, norms = prune.wanda_masks(model, CALIBRATION, parsed, batch_size=4, progress=False)
    ref, ref_keep, ref_norms = reference_wanda(hf, CALIBRATION, parsed.fraction,
                                               None if not parsed.structured else (parsed.n, parsed.m))
    assert set(masks) == set(ref_keep) and len(masks) == 3 * 7  # q k v o gate up down per layer
    for key, keep in masks.items():
        np.testing.assert_allclose(norms[key], ref_norms[key], rtol=2e-5, err_msg=str(key))
        np.testing.assert_array_equal(np.asarray(keep).T, ref_keep[key], err_msg=str(key))
        n_in = keep.shape[0]
        if parsed.structured:  # exactly 2 of every 4 consecutive inputs of each output row
            assert (np.asarray(keep).reshape(n_in // 4, 4, -1).sum(1) == 2).all()
        else:  # exactly half of every output row
            assert (np.asarray(keep).sum(0) == n_in // 2).all()
    pruned = prune.apply(model, masks)
    assert_logits_close(np.asarray(pruned(jnp.asarray(TOKENS))), hf_logits(ref, TOKENS))
    # functional: the stored weights stay as they were, and the pruned copy holds the same arrays
    after = kernels(model)
    assert all(np.array_equal(before[key], after[key]) for key in before)
    q = pruned.model.layers[0].self_attn.q_proj
    assert isinstance(q, prune.PrunedLinear) and q.kernel[...] is model.model.layers[0].self_attn.q_proj.kernel[...]
    assert q.keep[...].dtype == jnp.bool_


def test_wanda_calibrates_layer_by_layer_on_the_pruned_layers(setup):
    _, model = setup
    _, sequential = prune.wanda_masks(model, CALIBRATION, 0.5, progress=False)
    _, one_pass = prune.wanda_masks(model, CALIBRATION, 0.5, sequential=False, progress=False)
    # without `sequential` every norm is the dense model's: the probes' FFN input and intermediate state
    config = probes.ProbeConfig(points=("attn_input", "mlp_input", "intermediate"))
    _, result = probes.capture(model, jnp.asarray(CALIBRATION), config)
    norm = lambda x: np.sqrt((np.asarray(x, np.float64) ** 2).reshape(-1, x.shape[-1]).sum(0))
    for i in range(3):
        for name, point in (("self_attn.k_proj", "attn_input"), ("mlp.up_proj", "mlp_input"),
                            ("mlp.down_proj", "intermediate")):
            np.testing.assert_allclose(one_pass[(i, name)], norm(result.point(point)[i].full), rtol=1e-5)
    # layer 0 sees the embeddings either way; later layers see the pruned layers' outputs in the reference order
    np.testing.assert_allclose(sequential[(0, "mlp.down_proj")], one_pass[(0, "mlp.down_proj")], rtol=1e-6)
    assert not np.allclose(sequential[(2, "self_attn.q_proj")], one_pass[(2, "self_attn.q_proj")], rtol=1e-2)


def test_magnitude_per_matrix_n_m_and_global(setup):
    _, model = setup
    weights = kernels(model)
    per_matrix = prune.magnitude_masks(model, 0.5)
    for key, keep in per_matrix.items():
        keep, mag = np.asarray(keep), np.abs(weights[key])
        assert (~keep).sum() == keep.size // 2 and mag[~keep].max() <= mag[keep].min()
    for key, keep in prune.magnitude_masks(model, "4:8").items():
        keep, mag = np.asarray(keep).reshape(-1, 8, keep.shape[1]), np.abs(weights[key]).reshape(-1, 8, keep.shape[1])
        assert (keep.sum(1) == 4).all()
        assert (np.where(keep, mag, np.inf).min(1) >= np.where(keep, -np.inf, mag).max(1)).all()
    # global: exactly floor(s * total) with ties, matched against one stable sort of all weights (kernel order)
    rng = np.random.default_rng(0)
    tied = {(0, "a"): np.round(rng.normal(size=(6, 10)), 1).astype(np.float32),
            (1, "b"): np.round(rng.normal(size=(4, 5)), 1).astype(np.float32)}
    got = prune.keep_lowest_pruned({k: jnp.asarray(v) for k, v in tied.items()}, 0.37)
    flat = np.concatenate([np.abs(v).reshape(-1) for v in tied.values()])
    keep = np.ones(flat.size, bool)
    keep[np.argsort(flat, kind="stable")[:int(np.floor(0.37 * flat.size))]] = False
    np.testing.assert_array_equal(np.concatenate([np.asarray(g).reshape(-1) for g in got.values()]), keep)
    glob = prune.magnitude_masks(model, 0.5, scope="global")
    assert sum(int((~np.asarray(k)).sum()) for k in glob.values()) == sum(w.size for w in weights.values()) // 2
    with pytest.raises(ValueError, match="unstructured only"):
        prune.magnitude_masks(model, "2:4", scope="global")


def test_protected_massive_weights_survive_and_removed_counts_them(setup):
    _, model = setup
    mw = massive.find_massive_weights(model, first_token=5, k=3, layer=1)
    col = int(np.argmax(np.abs(kernels(model)[(1, "mlp.down_proj")][:, 3])))
    sws = [SuperWeight(layer=1, row=3, col=col, weight=0.0, input_value=0.0, output_value=0.0, position=0)]
    np.testing.assert_allclose(prune.massive_values(model, mw, 3), mw.values, rtol=1e-5)
    plain = prune.masks_for(model, "wanda", 0.5, calibration=CALIBRATION, progress=False)
    hit = prune.removed(plain, mw, 3, sws)["massive_rows"]
    assert hit["entries"] == 2 * 3 * 64 and hit["fraction_pruned"] == 0.5  # Wanda: half of every row, these too
    protect = prune.protected(model, mw, 3, sws)
    assert set(protect) == {(1, "mlp.gate_proj"), (1, "mlp.up_proj"), (1, "mlp.down_proj")}
    for method in ("wanda", "magnitude", "magnitude_global"):
        kept = prune.masks_for(model, method, 0.5, calibration=CALIBRATION, protect=protect, progress=False)
        got = prune.removed(kept, mw, 3, sws)
        assert got["massive_rows"]["entries_pruned"] == 0 and got["super_weights"]["pruned"] == 0, method
        gate = np.asarray(kept[(1, "mlp.gate_proj")])
        others = [r for r in range(96) if r not in mw.indices[:3]]
        if method == "wanda":  # the other rows keep the method's exact budget
            assert (gate[:, others].sum(0) == 32).all()
    # a removed super weight is counted
    down = dict(plain)
    down[(1, "mlp.down_proj")] = jnp.asarray(down[(1, "mlp.down_proj")]).at[col, 3].set(False)
    assert prune.removed(down, super_weights=sws)["super_weights"]["which"] == [sws[0].label]


def test_bad_specs():
    assert prune.parse_sparsity("4:8") == prune.Sparsity(0.5, 4, 8)
    for bad in ("2:2", "1.5", "half"):
        with pytest.raises(ValueError, match="sparsity"):
            prune.parse_sparsity(bad)
    with pytest.raises(ValueError, match="unknown pruning method"):
        prune.check_method("sparsegpt")


@pytest.mark.slow
def test_prune_experiment_on_smollm2(tmp_path):
    """The CLI end to end on the embedded SmolLM2, offline and CPU-sized."""
    out = subprocess.run([sys.executable, "-m", "experiments.prune", "--calibration=python_docs",
                          "--calibration_sequences=2", "--calibration_seqlen=64", "--datasets=python_docs",
                          "--seqlen=128", "--max_chunks=2", "--sparsities=0.5", f"--output_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "prune.json").read_text())
    assert result["massive_weights"]["layer"] == 11 and result["super_weights"]
    got = {(s["method"], s["sparsity"], s["protect"]): s for s in result["settings"]}
    assert len(got) == 4
    for (method, _, protect), s in got.items():
        rows = s["removed"]["massive_rows"]
        assert s["actual_sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3 if protect == "none" else 2e-3)
        if protect == "massive":
            assert rows["entries_pruned"] == 0 and s["removed"]["super_weights"]["pruned"] == 0
        elif method == "wanda":
            assert rows["fraction_pruned"] == 0.5
    ppl = {key: s["perplexity"]["python_docs"] for key, s in got.items()}
    assert ppl[("wanda", "50%", "none")] < ppl[("magnitude", "50%", "none")]
    assert "| wanda | 50% | none |" in (tmp_path / "prune.md").read_text()
    assert (tmp_path / "prune.png").stat().st_size > 0
