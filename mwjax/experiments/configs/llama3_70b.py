"""Llama-3-70B: the Table 5 recipe on a pod slice. Convert the checkpoint once
(`python -m converters.to_orbax --src meta-llama/Meta-Llama-3-70B --dst gs://BUCKET/llama3-70b`) and
pass `--config.model=` that directory, so every host restores only its shards. Variants as llama3_8b."""

from mwjax.experiments.configs.base import paper_run


def get_config(variant: str = "lora_macdrop"):
    """The Table 7 run of Llama-3-70B, 4-way tensor-parallel inside a host (convert it to orbax first: module doc).

    Args:
      variant: lora, lora_macdrop, dora or dora_macdrop, from `--config=llama3_70b:<variant>`.

    Returns:
      The run's ConfigDict (`base.paper_run`).
    """
    c = paper_run(variant, name="llama3_70b", model="meta-llama/Meta-Llama-3-70B", template="llama3")
    c.mesh.update({"data": 1, "fsdp": -1, "tensor": 4})  # 8192-wide layers: tensor-parallel inside a host
    return c
