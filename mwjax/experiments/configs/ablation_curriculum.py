"""Table 4: curriculum x p0 on the massive weights.

`--config=ablation_curriculum:step,0.8` (curriculum in step, epoch_before, epoch_after, exp, constant;
exp takes alpha as a third part, e.g. `exp,0.8,0.05`); the model and the rest as llama3_8b (LoRA)."""

from mwjax.experiments.configs.base import paper_run


def get_config(arg: str = "step,0.8"):
    """The Table 4 run of one curriculum and p0: LoRA + MacDrop on Llama-3-8B (llama3 template).

    Args:
      arg: `curriculum[,p0[,alpha]]` from `--config=ablation_curriculum:<arg>`: curriculum in step, epoch_before,
        epoch_after, exp, constant; p0 0.8 when left out; alpha, exp's decay rate, as a third part (`exp,0.8,0.05`).

    Returns:
      The run's ConfigDict, named ablation_curriculum_<curriculum>_p<p0> (and _a<alpha> for exp).
    """
    parts = arg.split(",")
    if len(parts) > 3:
        raise ValueError(f"--config=ablation_curriculum:{arg}: write curriculum[,p0[,alpha]]")
    curriculum, p0, alpha = parts + ["step", "0.8", "0.05"][len(parts):]  # a part left out takes its own default
    c = paper_run("lora_macdrop", name="ablation_curriculum", model="meta-llama/Meta-Llama-3-8B", template="llama3")
    c.name = f"ablation_curriculum_{curriculum}_p{p0}" + (f"_a{alpha}" if curriculum == "exp" else "")
    c.macdrop.update({"curriculum": curriculum, "p0": float(p0), "alpha": float(alpha)})
    return c
