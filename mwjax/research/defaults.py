"""The research methods' choices and defaults that command lines show (flag defaults, enum choices), in a module
without jax so that `--help` and a refused flag answer before jax loads. The methods import them from here
(`massive.SUPER_RATIO` is this module's); each says where in the papers or their reference code it comes from.
"""

# massive (House of Cards / Massive Activations): how the origin layer of the massive weights is chosen
LAYER_RULES = ("intermediate", "hidden_jump")

# massive (The Super Weight): detection as the reference code runs it
DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."  # the detection prompt of the Super Weight reference code
SPIKE_THRESHOLD = 50.0  # |down_proj input| and |output| of a super weight's layer (the reference code's 50)
SUPER_RATIO = 0.5  # a further row's own contribution, as a fraction of the largest |output|
# The Super Weight's iterative detection (massive.find_super_weights_iteratively): spikes in the last eighth of the
# layers are reported, never taken. SmolLM2's final-layer spikes (layers 27-29 of 30) fall there; every super weight
# of the paper's Table 2 does not (the deepest, OLMo-7B's layer 24 of 32, lies before layer 28).
LATE_FRACTION = 1 / 8

# The Super Weight, Table 1's control "Prune Non-SW": how many of the largest other weights are pruned
NON_SUPER_WEIGHTS = 7000

# attacks: the calibration set of "massive_activations:mean" (thesis: 100 sequences, kept apart from the evaluation)
CALIBRATION_CORPUS, CALIBRATION_SEQUENCES, CALIBRATION_SEQLEN = "python_docs", 100, 256
# attacks after fine-tuning, House of Cards Table 8's two readings: massive weights re-found on the merged model,
# or the pretrained rows under the live adapter
ATTACK_ON = ("merged", "base")

# prune (thesis ch. 3): the pruning metrics
PRUNE_METHODS = ("wanda", "magnitude", "magnitude_global")

# quantize (The Super Weight, Table 3 and Figure 7)
CLIP_METHODS = ("none", "zscore", "block_percentage", "tensor_percentage", "iqr")  # the reference's clipping methods
GRANULARITIES = ("tensor", "token")  # an activation scale per tensor (one per sequence) or per token
SMOOTHQUANT_ALPHA = 0.5  # SmoothQuant's migration strength for Llama-like models in The Super Weight's comparison
# Figure 7's curves
ROUND_TO_NEAREST = "round-to-nearest"
HELD_OUT = "super weights held out"
HANDLED = "clipped, super weights restored"
CLIPPED = "clipped, not restored"
CURVES = (ROUND_TO_NEAREST, HELD_OUT, HANDLED, CLIPPED)


def check_clip(method: str, threshold: float) -> None:
    """Refuse a clipping method with a threshold it cannot use (`quantize.rtn`'s clipping; inf: no clipping).

    Args:
      method: one of CLIP_METHODS.
      threshold: z for zscore, the IQR multiplier for iqr, the clipped fraction in (0, 1) for the percentage
        methods; inf turns clipping off.

    Raises:
      ValueError naming the method or the threshold.
    """
    if method not in CLIP_METHODS:
        raise ValueError(f"unknown clipping method {method!r}; choose from {CLIP_METHODS}")
    if method == "none" or threshold == float("inf"):
        return
    if not threshold > 0:
        raise ValueError(f"clipping threshold must be > 0 (or inf: no clipping), got {threshold}")
    if method.endswith("percentage") and threshold >= 1:
        raise ValueError(f"{method} clips a fraction of the weights: its threshold must lie in (0, 1), got {threshold}")
