"""The lm-evaluation-harness backend against lm-eval's own HF backend, on local copies of the five tasks."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from hf_reference import gguf_parsed_once, torch
from zeroshot_docs import write_task_data

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from mwjax import converters  # noqa: E402
from mwjax.eval import perplexity, zeroshot_tasks  # noqa: E402
from mwjax.eval.lm_eval import MwjaxLM  # noqa: E402

pytestmark = pytest.mark.leg311  # CI: with the slow tests on the py3.11 leg (pyproject's markers)


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    data = write_task_data(tmp_path_factory.mktemp("zeroshot_data"))
    include = tmp_path_factory.mktemp("zeroshot_tasks")
    names = zeroshot_tasks.write_local_tasks(data, include)
    return data, include, names


@pytest.fixture(scope="module")
def tiny(tiny_smol_vocab):
    hf, path = tiny_smol_vocab
    model, _ = converters.load(path, tokenizer=False)
    return hf, model, path


def evaluate_both(hf, model, tokenizer, tasks, manager, add_bos, **options):
    ours = lm_eval.simple_evaluate(model=MwjaxLM(model, tokenizer, batch_size=3, add_bos_token=add_bos),
                                   tasks=tasks, task_manager=manager, log_samples=True, num_fewshot=0, **options)
    ref = lm_eval.simple_evaluate(model=HFLM(pretrained=hf, tokenizer=tokenizer, batch_size=3, add_bos_token=add_bos),
                                  tasks=tasks, task_manager=manager, log_samples=True, num_fewshot=0, **options)
    worst = 0.0
    for task in tasks:
        for metric in ("acc,none", "acc_norm,none"):
            assert ours["results"][task].get(metric) == ref["results"][task].get(metric), (task, metric)
        for a, b in zip(ours["samples"][task], ref["samples"][task], strict=True):
            assert a["arguments"] == b["arguments"]  # same requests, tokenized the same way
            ll_a = np.array([r[0][0] for r in a["resps"]])
            ll_b = np.array([r[0][0] for r in b["resps"]])
            np.testing.assert_allclose(ll_a, ll_b, rtol=1e-4, atol=1e-4)
            assert [r[0][1] for r in a["resps"]] == [r[0][1] for r in b["resps"]]
            worst = max(worst, float(np.abs(ll_a - ll_b).max()))
    return worst


@pytest.mark.parametrize("add_bos", [None, True])
def test_matches_the_hf_backend_on_the_five_task_formats(tiny, smollm2_tokenizer, local_tasks, add_bos):
    hf, model, _ = tiny
    _, include, names = local_tasks
    worst = evaluate_both(hf, model, smollm2_tokenizer, names, TaskManager(include_path=str(include)), add_bos)
    print(f"tiny model, add_bos_token={add_bos}: max |loglikelihood difference| {worst:.2e}")


def test_chat_template_and_system_instruction_as_the_hf_backend(tiny, smollm2_tokenizer, local_tasks):
    """--apply_chat_template (with a --system_instruction) renders the same requests as lm-eval's HF backend."""
    hf, model, _ = tiny
    _, include, names = local_tasks
    evaluate_both(hf, model, smollm2_tokenizer, [n for n in names if n.startswith(("arc_easy", "piqa"))],
                  TaskManager(include_path=str(include)), None, apply_chat_template=True,
                  system_instruction="Answer the question.")


def test_loglikelihood_rolling_equals_perplexity(tiny, smollm2_tokenizer):
    _, model, _ = tiny
    lm = MwjaxLM(model, smollm2_tokenizer)
    text = "The lighthouse keeper climbed the stairs every evening and wound the clockwork. " * 3
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    tokens = lm.tok_encode(text)
    ppl = perplexity(model, np.asarray(tokens), len(tokens), add_bos=True, bos_id=lm.prefix_token_id,
                     progress=False)
    np.testing.assert_allclose(total, -ppl.mean_nll * len(tokens), rtol=1e-5)


def test_generate_until_matches_the_hf_backend(tiny, smollm2_tokenizer):
    hf, model, _ = tiny
    requests = [Instance("generate_until", {}, (context, {"until": ["\n", "."], "max_gen_toks": 12,
                                                           "do_sample": False}), i)
                for i, context in enumerate(["Question: what is two plus two?\nAnswer:", "Once upon a time"])]
    ours = MwjaxLM(model, smollm2_tokenizer, batch_size=2).generate_until(requests)
    ref = HFLM(pretrained=hf, tokenizer=smollm2_tokenizer, batch_size=2).generate_until(requests)
    assert ours == ref


@pytest.mark.parametrize("kind, args, message", [
    ("loglikelihood", ("", ""), r"request 0 \['', ''\]: the context and the continuation are both empty"),
    ("loglikelihood", ("Once upon", ""), r"request 0 \['Once upon', ''\]: its continuation has no tokens"),
    ("generate_until", ("Once", {"until": 5}), r"request 0 .*: generation option until=5 must be a non-empty"),
    ("generate_until", ("Once", {"until": ["\n", ""]}), r"until=\['\\n', ''\] must be a non-empty string"),
    ("generate_until", ("Once", {"until": ["."], "max_gen_toks": 0}), r"max_gen_toks=0 must be an integer >= 1"),
    ("generate_until", ("Once", {"until": ["."], "max_gen_toks": "x"}), r"max_gen_toks='x' is not a number"),
    ("generate_until", ("Once", {"until": ["."], "do_sample": True, "temperature": float("nan")}),
     r"temperature=nan must be finite and >= 0"),
    ("generate_until", ("Once", {"until": ["."], "max_gen_toks": 10_000}),
     r"max_gen_toks=10000 leaves no room for context in max_length=512"),
    ("generate_until", ("", {"until": ["."]}), r"the context has no tokens \(an empty context and add_bos_token=False"),
])
def test_a_request_that_cannot_be_scored_is_a_clear_error_naming_it(tiny, smollm2_tokenizer, kind, args, message):
    _, model, _ = tiny
    lm = MwjaxLM(model, smollm2_tokenizer, add_bos_token=False)
    with pytest.raises(ValueError, match=message):
        getattr(lm, kind)([Instance(kind, {}, args, 0)])


def test_a_tokenizer_larger_than_the_model_is_refused(embedded_tokenizer):
    from mwjax import models
    from mwjax.converters.tokens import VocabularyError
    from mwjax.nn.config import ModelConfig

    small = models.build(ModelConfig(model_type="llama", vocab_size=49152, hidden_size=32, intermediate_size=48,
                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    with pytest.raises(VocabularyError, match=r"emits ids up to 262143 .* config.vocab_size=49152"):
        MwjaxLM(small, embedded_tokenizer("gemma3-270m"))


def test_few_programs_for_many_lengths(tiny, smollm2_tokenizer):
    from mwjax.eval import continuations as backend

    _, model, _ = tiny
    lm = MwjaxLM(model, smollm2_tokenizer, batch_size=4)
    before = backend._score._cache_size()
    requests = [(None, list(range(3, 3 + n)), [7, 8]) for n in range(1, 60, 3)]
    lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert backend._score._cache_size() - before == 1  # one program for the call, not one per length


def test_lm_eval_command_line_knows_mwjax(tiny, local_tasks, tmp_path):
    _, _, path = tiny
    _, include, _ = local_tasks
    lm_eval_cli = str(Path(sys.executable).with_name("mwjax-lm-eval"))  # this environment's, activated or not
    cmd = [lm_eval_cli, "--model", "mwjax", "--model_args", f"pretrained={path},attack=zero_top_k:2,first_token=1",
           "--tasks", "arc_easy_local,winogrande_local", "--include_path", str(include), "--output_path",
           str(tmp_path), "--batch_size", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "arc_easy_local" in out.stdout and "winogrande_local" in out.stdout


def test_attack_after_fine_tuning_in_both_readings(tiny, tmp_path):
    from mwjax import attacks, massive, models, peft
    from mwjax.experiments.lm_eval_model import MwjaxPretrainedLM

    _, model, path = tiny
    tuned = peft.add_adapters(model, peft.LoraConfig(rank=2, alpha=4.0), seed=3)
    for layer in peft.adapters(tuned).values():
        layer.lora_b[...] = layer.lora_b[...] + 0.05
    peft.export_peft(tuned, tmp_path / "adapter")
    lm = MwjaxPretrainedLM(pretrained=str(path), adapter=str(tmp_path / "adapter"), attack="zero_top_k:2",
                           first_token=1)
    expected = attacks.from_spec(peft.merge(tuned), None, "zero_top_k:2", first_token=1)
    tokens = jnp.arange(3, 40)[None]
    np.testing.assert_allclose(models.forward(lm.model, tokens), models.forward(expected, tokens), rtol=1e-5,
                               atol=1e-5)
    assert lm.description["adapter"] == str(tmp_path / "adapter")
    # Table 8 read as the pretrained rows zeroed under the live adapter: rows found before fine-tuning
    base = MwjaxPretrainedLM(pretrained=str(path), adapter=str(tmp_path / "adapter"), attack="zero_top_k:2",
                             first_token=1, attack_on="base")
    assert peft.adapters(base.model) and base.description["attack_on"] == "base"
    expected = attacks.zero_top_k(tuned, massive.find_massive_weights(model, None, k=2, first_token=1), 2)
    got = models.forward(base.model, tokens)
    np.testing.assert_allclose(got, models.forward(expected, tokens), rtol=1e-5, atol=1e-5)
    assert np.abs(got - models.forward(lm.model, tokens)).max() > 1e-3  # the readings differ


def test_zeroshot_experiment_from_local_data(tiny, local_tasks, tmp_path):
    _, _, path = tiny
    data, _, _ = local_tasks
    out = subprocess.run([sys.executable, "-m", "experiments.zeroshot", f"--model={path}", f"--data_dir={data}",
                          "--label=tiny", f"--output_dir={tmp_path}"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "zeroshot.json").read_text())
    assert set(result["scores"]) == {*zeroshot_tasks.PAPER_TASKS, "mean"}
    assert "| tiny |" in (tmp_path / "zeroshot.md").read_text()
    # the papers' bos choice (lm-eval <= 0.4.9.1: none for HF models) is the default, printed and recorded
    assert result["add_bos_token"] == "false" and "add_bos_token=false (as the papers'" in out.stdout


def test_zeroshot_writes_task_configs_for_include_path(local_tasks, tmp_path):
    data, _, _ = local_tasks
    out = subprocess.run([sys.executable, "-m", "experiments.zeroshot", f"--data_dir={data}",
                          f"--write_tasks={tmp_path}", "--tasks=piqa,boolq"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"--include_path={tmp_path} --tasks=piqa_local,boolq_local" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boolq_local.yaml", "piqa_local.yaml"]


def test_missing_local_data_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="export_task_data"):
        zeroshot_tasks.write_local_tasks(tmp_path, tmp_path / "inc", ["piqa"])


@pytest.mark.slow
def test_smollm2_matches_the_hf_backend(smollm2_path, smollm2_tokenizer, local_tasks):
    _, include, names = local_tasks
    model, _ = converters.load(smollm2_path, dtype=jnp.float32, tokenizer=False)
    with gguf_parsed_once():
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent),
                                                               gguf_file=smollm2_path.name, dtype=torch.float32).eval()
    worst = evaluate_both(hf, model, smollm2_tokenizer, names, TaskManager(include_path=str(include)), True)
    print(f"SmolLM2: max |loglikelihood difference| {worst:.2e}")
