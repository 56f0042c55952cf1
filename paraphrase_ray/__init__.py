"""paraphrase-ray: soft-prompt tuning of frozen causal LMs for paraphrasing, swept with Ray Tune, served with Ray Serve."""

__version__ = "0.1.0"
