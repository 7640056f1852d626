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

# attacks: the calibration set of "massive_activations:mean" (thesis: 100 sequences, kept apart from the evaluation)
CALIBRATION_CORPUS, CALIBRATION_SEQUENCES, CALIBRATION_SEQLEN = "python_docs", 100, 256
# attacks after fine-tuning, House of Cards Table 8's two readings: massive weights re-found on the merged model,
# or the pretrained rows under the live adapter
ATTACK_ON = ("merged", "base")

# prune (thesis ch. 3): the pruning metrics
PRUNE_METHODS = ("wanda", "magnitude", "magnitude_global")
