"""Shared fixtures: tiny random HF models saved to disk, the embedded SmolLM2 and its tokenizer. The
PyTorch / HF reference helpers are in `hf_reference` (tests import them from there)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One persistent XLA compilation cache for the session, inherited by every subprocess the tests launch: the
# experiment runs relaunched after a kill, the two-process launches and the CLI checks compile the same
# programs again and again (the kill-and-resume test: 81 -> 40 s). Keyed by the program, jax version and
# flags, so a hit is the program XLA would compile; fresh per session, so the suite's time stays honest.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mwjax-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")  # not the many tiny programs

import jax
import pytest
import transformers

jax.config.update("jax_default_matmul_precision", "highest")

from hf_reference import TINY_CONFIGS, WORST_RATIO, make_hf_model, needs_torch, torch  # noqa: E402

from mwjax.families.hf_config import read_hf_config  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """name -> (HF model, directory it was saved to with safetensors)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = make_hf_model(name)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = (model, path)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """name -> a HF directory (config.json + safetensors) of a random mwjax model of one of TINY_CONFIGS,
    written by `save_hf` without torch: for tests that need a checkpoint but not the PyTorch reference."""
    from mwjax import models
    from mwjax.converters import save_hf

    cache = {}

    def get(name: str):
        if name not in cache:
            cls_name, kwargs = TINY_CONFIGS[name]
            config = read_hf_config(getattr(transformers, cls_name)(**kwargs).to_dict())
            cache[name] = save_hf(models.build(config, seed=0), tmp_path_factory.mktemp(f"tiny_{name}"))
        return cache[name]

    return get


def pytest_collection_modifyitems(items):
    """Files holding slow or multi-process tests (minutes each) run first, each file's tests kept together and in
    their order: `-n 2 --dist loadfile` hands out files in this order, so no long file starts when the other
    worker has nothing left to do."""
    heavy = {item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("multiprocess")}
    first = {}
    for index, item in enumerate(items):
        first.setdefault(item.path, index)
    items.sort(key=lambda item: (item.path not in heavy, first[item.path]))


def pytest_runtest_setup(item):
    if item.get_closest_marker("torch") is not None:
        needs_torch()


def _checkout_files() -> set[str] | None:
    """Every file in the checkout that git does not track, ignored ones included (None outside a git checkout)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).parent.parent
    run = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=root,
                         capture_output=True, text=True)
    if run.returncode != 0:
        return None
    caches = ("__pycache__/", ".pytest_cache/", ".ruff_cache/", ".egg-info/")
    return {line[3:] for line in run.stdout.splitlines() if not any(c in line for c in caches)}


CHECKOUT_FILES = pytest.StashKey[set]()
CHECKOUT_LEFT = pytest.StashKey[list]()


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # the controlling process, once per run
        session.config.stash[CHECKOUT_FILES] = _checkout_files()


def pytest_sessionfinish(session, exitstatus):
    """Tests write under tmp_path only: a file left in the checkout fails the run, named."""
    before = session.config.stash.get(CHECKOUT_FILES, None) if not hasattr(session.config, "workerinput") else None
    after = _checkout_files() if before is not None else None
    if after is not None and (left := sorted(after - before)):
        session.config.stash[CHECKOUT_LEFT] = left
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if left := terminalreporter.config.stash.get(CHECKOUT_LEFT, None):
        terminalreporter.write_sep("!", "the tests left files in the checkout (write under tmp_path)", red=True)
        for path in left:
            terminalreporter.write_line(path)
    _parity_margins(terminalreporter)


def _parity_margins(terminalreporter):
    """The parity margins of this run: the closest any comparison came to its tolerance."""
    if WORST_RATIO:
        worst = sorted(WORST_RATIO.items(), key=lambda kv: -kv[1])[:12]
        terminalreporter.write_sep("-", "parity margins: worst |got - ref| / tolerance per test (1.0 fails)")
        for test, ratio in worst:
            terminalreporter.write_line(f"{ratio:8.3f}  {test}")


@pytest.fixture(scope="session")
def smollm2_path():
    from mwjax.converters import embedded

    return embedded.path("smollm2")


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """name -> the embedded model's tokenizer as `converters.load_tokenizer` builds it, once per session
    (Gemma-3's takes ~25 s to parse and build)."""
    import functools

    from mwjax import converters

    return functools.cache(lambda name: converters.load_tokenizer(f"embedded:{name}"))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    """SmolLM2's real BPE tokenizer (49152 tokens), built by transformers from the GGUF metadata."""
    from mwjax.converters.gguf_source import GGUFSource

    return GGUFSource(smollm2_path).tokenizer()


@pytest.fixture(scope="session")
def tiny_smol_vocab(smollm2_tokenizer, tmp_path_factory):
    """(HF model, directory): a tiny random llama with SmolLM2's vocabulary, saved with the real tokenizer
    (and its chat template)."""
    needs_torch()
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                                      bos_token_id=1, eos_token_id=2, max_position_embeddings=512)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    path = tmp_path_factory.mktemp("tiny_smol_vocab")
    hf.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="session")
def tiny_smol_dir(smollm2_tokenizer, tmp_path_factory):
    """A HF directory of a tiny random llama (mwjax's init, written by `save_hf`, no torch) with SmolLM2's
    vocabulary and real tokenizer: experiments run end to end on it in seconds."""
    from mwjax import models
    from mwjax.converters import save_hf
    from mwjax.nn.config import ModelConfig

    config = ModelConfig(model_type="llama", vocab_size=49152, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         bos_token_id=1, eos_token_id=2, max_position_embeddings=512)
    return save_hf(models.build(config, seed=0), tmp_path_factory.mktemp("tiny_smol_dir"), tokenizer=smollm2_tokenizer)
