"""paraphrase-ray: soft-prompt tuning of frozen causal LMs for paraphrasing, swept with Ray Tune, served with Ray Serve.

    from paraphrase_ray import Paraphraser
    Paraphraser.from_pretrained("runs/p").paraphrase(["It rained all day."])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Paraphraser", "__version__"]

if TYPE_CHECKING:
    from paraphrase_ray.api import Paraphraser


def __getattr__(name: str) -> Any:
    # imported on first use: `import paraphrase_ray.config` (and so `paraphrase-ray --help`) stays free of torch
    if name == "Paraphraser":
        from paraphrase_ray.api import Paraphraser

        return Paraphraser
    raise AttributeError(f"module 'paraphrase_ray' has no attribute {name!r}")
