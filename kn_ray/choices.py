"""Names every layer shares, spelled once and importable without torch (the CLI builds its
flags from them before any command imports the engine)."""

AUTO = "auto"  # let kn-ray choose: steps (adaptive), batch sizes (from the device's memory), dtypes, precisions
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # compute (autocast) precision
DTYPES = ("auto", "fp32", "bf16", "fp16")  # the weights' dtype, separate from the compute precision
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # Accelerate's placement strategies
NOISE = ("input", "weights", "both")  # what noisy copies perturb: SmoothGrad, NoiseGrad, FusionGrad
NOISED_WEIGHTS = ("all", "above")  # NoiseGrad: every weight, or from the scaled layer's block up
