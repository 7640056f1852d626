"""Figure 6: constant dropout probability p on one of three scopes of layer l's W_gate / W_up rows.

`--config=ablation_scope:massive,0.5` (scope in massive, all, all_but_massive; p in [0, 1]); the model
and everything else as llama3_8b (LoRA), e.g. `--config.model=...` to change it."""

from mwjax.experiments.configs.base import paper_run


def get_config(arg: str = "massive,0.5"):
    """The Figure 6 run of one scope and p: LoRA + MacDrop on Llama-3-8B, constant dropout probability p.

    Args:
      arg: `scope[,p]` from `--config=ablation_scope:<arg>`: scope in massive, all, all_but_massive; p in [0, 1],
        0.5 when left out.

    Returns:
      The run's ConfigDict, named ablation_scope_<scope>_p<p>.
    """
    scope, _, p = arg.partition(",")
    c = paper_run("lora_macdrop", name="ablation_scope", model="meta-llama/Meta-Llama-3-8B", template="llama3")
    c.name = f"ablation_scope_{scope}_p{p or 0.5}"
    c.macdrop.update({"curriculum": "constant", "scope": scope, "p0": float(p or 0.5)})
    return c
