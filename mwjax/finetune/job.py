"""One MacDrop fine-tuning run end to end (House of Cards §3, Algorithm 1), from a config: check every setting
(`plan`), take the output directory (one run per directory, `output_dir_lock`; resume, refuse or overwrite what it
holds, `prepare_output_dir`), load the model, find the massive weights, train LoRA / DoRA with MacDrop's curriculum
(`train.fit`), save the adapter (orbax and HF PEFT) and, last, results.json. `run` is what
`python -m experiments.macdrop` and `experiments.report` call; the config's fields and defaults are those of
`mwjax/experiments/configs/base.py` (an ml_collections ConfigDict: sections train, lora, data, macdrop, massive,
mesh)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from mwjax import converters
from mwjax.adapters import peft
from mwjax.converters import embedded
from mwjax.core import atomic, compiled, distributed, run_lock, sharding
from mwjax.finetune import data, train
from mwjax.research import macdrop, massive

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run's settings, every one checked (`plan` raises on the first bad one)."""

    config: ConfigDict
    train: train.TrainConfig
    lora: peft.LoraConfig
    data: data.DataConfig
    output_dir: Path


def plan(config: ConfigDict) -> Plan:
    """Check the whole config before anything is loaded or computed; ValueError naming the bad field
    (config.<section>.<field>) on the first bad one.

    Args:
      config: the run's ConfigDict (`experiments/configs/base.py`).

    Returns:
      The `Plan`: the train / lora / data sections as library dataclasses and the output directory
      (config.output_dir, default runs/<name>).
    """
    tc = _section(config, "train", train.TrainConfig)
    lc = _section(config, "lora", peft.LoraConfig)
    dc = _section(config, "data", data.DataConfig)
    md = config.macdrop
    if md.enabled:
        if md.scope not in macdrop.SCOPES:
            raise ValueError(f"config.macdrop.scope: unknown MacDrop scope {md.scope!r}; choose from {macdrop.SCOPES}")
    if not 0 <= md.alpha < math.inf:
        raise ValueError(f"config.macdrop.alpha must be a finite number >= 0, got {md.alpha}")
    if md.enabled:
        try:
            macdrop.curriculum(md.curriculum, md.p0, total_steps=1, steps_per_epoch=1, epochs=1, alpha=md.alpha)
        except ValueError as e:
            raise ValueError(f"config.macdrop (p0, curriculum, alpha): {e}") from e
    m = config.massive
    if m.k < 1:
        raise ValueError(f"config.massive.k must be >= 1, got {m.k}")
    if m.layer is not None and m.layer < 0:
        raise ValueError(f"config.massive.layer must be >= 0 (0-based, HF numbering), got {m.layer}")
    if m.indices is not None:
        if m.layer is None:
            raise ValueError("config.massive.indices given without massive.layer (0-based, HF numbering)")
        if len(m.indices) < m.k:
            raise ValueError(f"config.massive.indices holds {len(m.indices)} rows but k={m.k}")
        if min(m.indices) < 0:
            raise ValueError(f"config.massive.indices must be rows >= 0, got {tuple(m.indices)}")
    for axis in ("data", "fsdp", "tensor"):
        size = config.mesh[axis]
        if size == 0 or size < -1:
            raise ValueError(f"config.mesh.{axis} must be >= 1 devices (or -1: the devices left), got {size}")
    for name in ("dtype", "param_dtype"):
        if config[name] not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"config.{name}: unknown dtype {config[name]!r}; use float32 or bfloat16")
    return Plan(config, tc, lc, dc, Path(config.output_dir or Path("runs") / config.name))


def _section(config: ConfigDict, name: str, cls):
    """config.<name> as the library dataclass `cls`, its own checks' errors naming the section."""
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config[name].to_dict().items()}
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.{name}: {e}") from e


RUN_FILES = ("config.json", "massive_weights.json", "metrics.jsonl", "results.json", "adapter", "adapter_peft",
             "checkpoints")
NOT_COMPARED = ("output_dir", "resume", "overwrite_output_dir", "compilation_cache_dir")  # may change on relaunch


def library_defaults() -> dict[str, dict]:
    """The config sections that are library dataclasses, with their defaults: a field a newer mwjax added to
    them reads, in a run's older config.json, as absent, and the run used its default."""
    return {"train": dataclasses.asdict(train.TrainConfig()), "lora": dataclasses.asdict(peft.LoraConfig()),
            "data": dataclasses.asdict(data.DataConfig())}


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The fields whose value differs between two configs, NOT_COMPARED left out, and a field absent from `old`
    but at its library default in `new` (added by a newer mwjax) not counted as a change.

    Args:
      old: the earlier run's config (its config.json, as a dict).
      new: this run's config, as a dict.
      prefix: the dotted path of the section compared (for the recursion); "" at the top.

    Returns:
      'field: old -> new' for each change (dotted paths, sorted; '<absent>' for a missing field).
    """
    changes = []
    defaults = library_defaults()
    for key in sorted(set(old) | set(new)):
        name, a, b = prefix + key, old.get(key, "<absent>"), new.get(key, "<absent>")
        if name in NOT_COMPARED:
            continue
        section, _, field = name.partition(".")
        if a == "<absent>" and field in defaults.get(section, {}) and _jsonable(b) == _jsonable(
                defaults[section][field]):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, name + ".")
        elif a != b:
            changes.append(f"{name}: {a!r} -> {b!r}")
    return changes


def _jsonable(value):
    return json.loads(json.dumps(value))  # tuples as lists, as config.json holds them


def prepare_output_dir(config: ConfigDict, out: Path, checkpoint_dir) -> dict | None:
    """Decide what to do with what `out` holds (module doc) before the model is loaded; write config.json.

    An earlier run there with another config is refused (ValueError) unless config.resume (continue it, its old
    config.json kept as config.step<N>.json) or config.overwrite_output_dir (its files deleted first).

    Args:
      config: the run's ConfigDict (resume, overwrite_output_dir).
      out: the output directory.
      checkpoint_dir: where the run's checkpoints go (a path or a gs:// URL).

    Returns:
      results.json's content when the same run already finished, else None (start or resume).
    """
    if config.resume and config.overwrite_output_dir:
        raise ValueError("config.resume and config.overwrite_output_dir exclude each other")
    lead = distributed.is_lead()
    checkpoints = epath.Path(checkpoint_dir)
    new = json.loads(config.to_json_best_effort())
    if config.overwrite_output_dir:
        if lead:
            for target in [out / name for name in RUN_FILES] + [checkpoints]:
                if target.is_dir():
                    epath.Path(target).rmtree()
                elif target.exists():
                    target.unlink()
    latest = train.Checkpoints.latest_in(checkpoints)
    results = out / "results.json"
    if not config.overwrite_output_dir and (latest is not None or results.exists()):
        previous = out / "config.json"
        changes = (config_changes(json.loads(previous.read_text()), new) if previous.exists()
                   else ["config.json is missing"])
        if changes and not config.resume:
            raise ValueError(
                f"{out} holds a run (checkpoint step {latest}{', finished' if results.exists() else ''}) with another "
                f"config: {'; '.join(changes)}. Pass --config.resume=True to continue it with this config, "
                "--config.overwrite_output_dir=True to delete it and start afresh, or another --config.output_dir")
        if not changes and results.exists():
            return json.loads(results.read_text())
        if changes and lead:
            log.warning("resuming from step %s with a changed config: %s", latest, "; ".join(changes))
            if previous.exists():
                kept = f"config.step{latest}.json" if latest is not None else "config.previous.json"
                os.replace(previous, out / kept)
    if lead:
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic.write_text_atomically(out / "config.json", json.dumps(new, indent=2))
        except OSError as e:
            raise ValueError(f"cannot write to output_dir {out}: {e}") from e
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("output_dir prepared")
    return None


def massive_weights(model, tokenizer, config: ConfigDict) -> massive.MassiveWeights:
    """The massive weights MacDrop targets: from the config when it names them, else found with the bos token
    (Algorithm 1, lines 1-3).

    Args:
      model: the base model.
      tokenizer: its tokenizer (for the bos token, or config.first_token).
      config: the run's ConfigDict (massive.k, massive.layer, massive.indices, first_token).

    Returns:
      A `massive.MassiveWeights`: the layer and rows of W_gate / W_up (selected_by "given" when the config
      names them).
    """
    m, d_ff = config.massive, model.config.intermediate_size
    if m.k > d_ff:
        raise ValueError(f"massive.k={m.k} exceeds the model's d_ff={d_ff}")
    if m.indices is not None:
        if not 0 <= m.layer < model.config.num_hidden_layers or max(m.indices) >= d_ff:
            raise ValueError(f"massive.layer={m.layer} / indices {tuple(m.indices)} lie outside the model "
                             f"({model.config.num_hidden_layers} layers, d_ff={d_ff})")
        # given, not measured: no values, no bos token
        return massive.MassiveWeights(layer=m.layer, indices=tuple(m.indices), values=(), median=0.0, token_id=-1,
                                      selected_by="given")
    return massive.find_massive_weights(model, tokenizer, k=m.k, layer=m.layer, first_token=config.first_token)


def run(config: ConfigDict, *, stop_after: int | None = None, loaded: tuple | None = None) -> dict:
    """The whole run (module doc), holding the output directory's lock (`output_dir_lock`) throughout.

    Args:
      config: the run's ConfigDict (`experiments/configs/base.py`).
      stop_after: stop (after checkpointing) once this many steps are done, as an interruption would; None
        trains to the end.
      loaded: (model, tokenizer) of `config.model` already in memory in `config.dtype` (e.g. several runs on one
        model, as `experiments.report` makes), used instead of loading it again; it is not modified.

    Returns:
      What results.json holds; {"step", "steps"} when stopped early by `stop_after`.
    """
    p = plan(config)
    distributed.initialize()
    lead = distributed.is_lead()
    log.setLevel(logging.INFO if lead else logging.WARNING)  # one voice in a multi-host run
    cache = config.compilation_cache_dir
    if cache := compiled.keep_compiled_programs(embedded.cache_dir() / "xla" if cache is None else cache):
        log.info("compiled programs are kept in %s (a relaunch loads them)", cache)
    # one run per output directory (and per checkpoint directory), before anything in them is touched
    with output_dir_lock(p.output_dir, config.checkpoint_dir):
        return _run(config, p, stop_after=stop_after, loaded=loaded)


def output_dir_lock(out: Path, checkpoint_dir=None) -> contextlib.ExitStack:
    """The run's hold on `out` (`mwjax.core.run_lock`), and on `checkpoint_dir` where it lies elsewhere on a local
    filesystem (two runs writing one checkpoint directory would adopt each other's steps): process 0 takes the
    locks for the whole run (it alone writes the run's files); in a multi-host run every process learns whether it
    got them, so all stop together when another run holds either directory (`run_lock.DirectoryLockedError`).

    Args:
      out: the run's output directory.
      checkpoint_dir: the run's checkpoint directory; None, a URL, or a path inside `out` takes no second lock.

    Returns:
      An ExitStack holding the locks (empty on other processes); leave it (`with`) to release them.
    """
    held = [Path(out)]
    if checkpoint_dir and "://" not in str(checkpoint_dir):  # gs:// and the like have no flock
        checkpoints = Path(checkpoint_dir).resolve()
        if not checkpoints.is_relative_to(Path(out).resolve()):
            held.append(checkpoints)
    stack = contextlib.ExitStack()
    error = None
    if distributed.is_lead():
        try:
            for directory in held:
                stack.enter_context(run_lock.hold(directory, what="experiments.macdrop run"))
        except run_lock.DirectoryLockedError as e:
            error = e
        except OSError as e:
            error = ValueError(f"cannot write to output_dir {out}: {e}")
    if jax.process_count() > 1:
        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if refused and error is None:
            error = run_lock.DirectoryLockedError(f"{out} is in use by another run (process 0's message names it)")
    if error is not None:
        stack.close()
        raise error
    return stack


def _run(config: ConfigDict, p: Plan, *, stop_after: int | None, loaded: tuple | None) -> dict:
    """`run` once the output directory is this run's."""
    lead = distributed.is_lead()
    out = p.output_dir
    checkpoint_dir = config.checkpoint_dir or out / "checkpoints"
    finished = prepare_output_dir(config, out, checkpoint_dir)
    if finished is not None:
        log.info("%s holds this run, finished: its results.json is the result", out)
        return finished
    model_path = converters.resolve(config.model)  # a missing model, then a bad data file: seconds, not minutes
    rows = data.load_examples(p.data)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    if loaded is None:
        model, tokenizer = converters.load(model_path, dtype=jnp.dtype(config.dtype),
                                           param_dtype=jnp.dtype(config.param_dtype),
                                           shardings=sharding.param_sharding_fn(mesh))
    else:
        model, tokenizer = loaded
        if jnp.dtype(model.dtype) != jnp.dtype(config.dtype):
            raise ValueError(f"the loaded model computes in {jnp.dtype(model.dtype)}, the config asks for "
                             f"dtype={config.dtype}")
    peft.select_targets(model, p.lora)  # a pattern that matches nothing fails here, before any compute
    mw = massive_weights(model, tokenizer, config)
    log.info("massive weights: %s (%s), rows %s", mw.label, mw.selected_by, mw.indices[: config.massive.k])

    train_examples, val_examples = data.build(p.data, tokenizer, rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loader = lambda examples, seed: data.BatchLoader(examples, p.train.micro_batch_size, p.data.cutoff_len,
                                                     seed=seed, pad_id=pad_id, packing=p.data.packing)
    train_loader = loader(train_examples, p.train.seed)
    val_loader = loader(val_examples, 0) if val_examples else None
    steps = train.total_steps(p.train, len(train_loader))

    lora_model = peft.add_adapters(model, p.lora, seed=p.train.seed)
    md = None
    if config.macdrop.enabled:
        per_epoch = math.ceil(len(train_loader) / p.train.grad_accum)  # optimizer steps per epoch
        schedule = macdrop.curriculum(config.macdrop.curriculum, config.macdrop.p0, total_steps=steps,
                                      steps_per_epoch=per_epoch, epochs=math.ceil(steps / per_epoch),
                                      alpha=config.macdrop.alpha)
        md = macdrop.MacDrop.from_massive_weights(mw, config.massive.k, model.config.hidden_size,
                                                  model.config.intermediate_size, schedule, scope=config.macdrop.scope)
    trainer = train.Trainer(lora_model, p.train, steps=steps, mesh=mesh, macdrop=md)
    del model, lora_model  # the trainer holds its own (stacked) copy of the layers: one copy on the devices, not two

    if lead:
        atomic.write_text_atomically(out / "massive_weights.json", json.dumps(mw.to_dict(), indent=2))
    meta = {"config": config.name, "massive_weights": mw.to_dict()}
    result = train.fit(trainer, train_loader, val_loader, output_dir=out, meta=meta, stop_after=stop_after,
                       checkpoint_dir=checkpoint_dir, eval_before=config.eval_before)
    if int(result.state.step) < steps:  # interrupted on purpose (stop_after): the checkpoint is the output
        return {"step": int(result.state.step), "steps": steps}

    tuned = trainer.model(result.state)
    peft.save_adapters(tuned, out / "adapter")
    before = [loss for step, loss in result.eval_losses if step == 0]
    summary = {
        "config": config.name, "model": config.model, "steps": steps, "massive_weights": mw.to_dict(),
        "macdrop": config.macdrop.to_dict() if md else None, "lora": dataclasses.asdict(p.lora),
        "eval_loss_before": before[0] if before else None, "eval_losses": [e for e in result.eval_losses if e[0]],
        "final_train_loss": result.history[-1]["loss"] if result.history else None,
        "adapter": str(out / "adapter"), "adapter_peft": None,
    }
    if lead:
        try:
            base, gguf_file = converters.peft_base(config.model)
            summary["adapter_peft"] = str(peft.export_peft(tuned, out / "adapter_peft", base_model_name_or_path=base,
                                                           gguf_file=gguf_file))
        except ValueError as e:  # adapters PEFT cannot hold (Phi-3 without lora.fuse, Mixtral experts)
            log.warning("no PEFT export: %s", e)
        # last: its presence means done
        atomic.write_text_atomically(out / "results.json", json.dumps(summary, indent=2))
    return summary
