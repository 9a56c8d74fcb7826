"""Names and defaults every layer shares, spelled once and importable without torch (the CLI
builds its flags from them before any command imports the engine)."""

AUTO = "auto"  # let kn-ray choose: steps (adaptive), batch sizes (from the device's memory), dtypes, precisions
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # compute (autocast) precision
DTYPES = ("auto", "fp32", "bf16", "fp16")  # the weights' dtype, separate from the compute precision
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # Accelerate's placement strategies
RULES = ("left", "right", "midpoint", "trapezoid", "gausslegendre")  # quadrature rules (engine.quadrature)
NOISE = ("input", "weights", "both")  # what noisy copies perturb: SmoothGrad, NoiseGrad, FusionGrad
NOISED_WEIGHTS = ("all", "above")
# post-normed FFNs (Gemma 2/3, OLMo 2): hold the post-FFN norm's clean RMS fixed along IG's path, or let it follow
POST_NORMS = ("frozen", "live")  # NoiseGrad: every weight, or from the scaled layer's block up

# defaults of the engine's keywords, which the declared options take over
# n_steps: adaptive, each (prompt, layer) until its scores converge (docs/quadrature.md: fixed rules miss
# the steps that real models' P(alpha) takes); `rule` applies to a fixed n_steps: left with PAPER_STEPS
# steps is the paper's Riemann sum (Dai et al. 2022, m = 20)
N_STEPS, RULE = AUTO, "left"
# circuits (EAP-IG): no adaptive rule, so n_steps auto (and the engine's default) is Gauss-Legendre with 5
# nodes; a fixed --n-steps without --rule takes CIRCUIT_RULE too. Precision auto computes them in fp32
# (half weights aside): bf16 autocast grew the completeness residual from 3e-6 to 0.11 of a change of 3.2
CIRCUIT_STEPS, CIRCUIT_RULE = 5, "gausslegendre"
RESIDUAL_SHARE = 0.05  # the run summary warns where completeness or input_residual > this x |M(clean) - M(corrupted)|
PAPER_STEPS = 20
TOLERANCE = 0.01  # n_steps=auto: per (prompt, layer), the scores' estimated relative L2 error and the
#                   completeness residual (x |P - P(layer at baseline)|) <= TOLERANCE
STDEVS = 0.1  # input noise per token, x its embedding's RMS (0 would make noisy copies all alike)
POST_NORM = "frozen"  # where the adapter names a post-FFN norm (docs/quadrature.md); elsewhere no effect
WEIGHT_STDEVS = 0.2  # NoiseGrad: each weight x N(1, WEIGHT_STDEVS)

MEMORY_LIMIT = "256MB"  # DuckDB, every stage: beyond it joins and group-bys spill to disk (benchmarks/aggregate.md)
