"""The paper's decision flow: which pruning paradigm and recovery to use for a budget.

Huang et al., "Investigating Structural Pruning and Recovery Techniques for Compressing MLLMs"
(arXiv 2507.20749), as summarised in shared/DESIGN.md:

- no recovery budget -> widthwise pruning (it degrades more gracefully untrained);
- <= 15 % removed with recovery -> layerwise + projector-only finetuning;
- 15-30 % -> layerwise + SFT with hidden-state L2 distillation ("SFT + L2 KD");
- beyond 30 % (the paper measures 45 % and 60 %) -> widthwise + SFT + L2 KD, with more data.

``recipe_for`` turns the advice into a raw recipe (validated by :class:`compression.runs.recipe.Recipe`) to prefill the
Compress form. No streamlit here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Compute = Literal["none", "some", "plenty"]
COMPUTE_CHOICES: dict[str, str] = {
    "none": "none (no training)",
    "some": "some (minutes: projector or LoRA)",
    "plenty": "plenty (full language-model finetuning)",
}


@dataclass(frozen=True)
class Advice:
    method: Literal["layer", "width"]
    recovery_mode: Literal["none", "projector", "lora", "full"]
    distillation: Literal["none", "hidden"]
    data_fraction: float
    reason: str

    @property
    def summary(self) -> str:
        paradigm = "layerwise" if self.method == "layer" else "widthwise"
        if self.recovery_mode == "none":
            return f"{paradigm} pruning, no recovery"
        training = {"projector": "projector-only finetuning", "lora": "LoRA on the language model + projector",
                    "full": "full language-model finetuning"}[self.recovery_mode]
        kd = " with hidden-state L2 distillation (SFT + L2 KD)" if self.distillation == "hidden" else ""
        return f"{paradigm} pruning, then {training}{kd} on {self.data_fraction:.0%} of the training data"


def decision_flow(ratio: float, data_fraction: float = 0.05, compute: Compute = "some") -> Advice:
    """Advice for removing ``ratio`` of the language model's parameters.

    ``data_fraction`` is the share of the training set available for recovery; ``compute``
    says how much training the user can afford.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"budget ratio {ratio} must be in (0, 1): the fraction of language-model parameters removed")
    if not 0 < data_fraction <= 1:
        raise ValueError(f"data fraction {data_fraction} must be in (0, 1]")
    if compute not in COMPUTE_CHOICES:
        raise ValueError(f"compute {compute!r} must be one of {', '.join(COMPUTE_CHOICES)}")
    heavy = "full" if compute == "plenty" else "lora"
    if compute == "none":
        return Advice("width", "none", "none", data_fraction,
                      "No recovery budget: widthwise pruning keeps more of the original untrained "
                      "(paper: 90.9 % kept at 15 % widthwise vs 72.2 % layerwise on LLaVA-1.5-7B).")
    if ratio <= 0.15:
        return Advice("layer", "projector", "none", min(data_fraction, 0.05),
                      "Up to ~15 % with recovery: layerwise pruning plus projector-only finetuning suffices "
                      "(paper: projector finetuning is enough below ~20 %).")
    if ratio <= 0.30:
        return Advice("layer", heavy, "hidden", min(data_fraction, 0.05),
                      "15-30 % with recovery: layerwise pruning with SFT + hidden-state L2 distillation keeps "
                      ">96 % (paper: 98.1 % at 15 %, 96.4 % at 30 % on LLaVA-1.5-7B with 5 % of the data).")
    return Advice("width", heavy, "hidden", data_fraction,  # all the data there is
                  "Beyond 30 %: widthwise pruning with SFT + L2 distillation and more data "
                  "(paper: 84.0 % kept at 45 % and 78.1 % at 60 % widthwise on LLaVA-1.5-7B).")


def recipe_for(source: str, ratio: float, advice: Advice, data: dict | None = None, eval_samples: int = 200) -> dict:
    """The raw recipe (a dict for :class:`compression.runs.recipe.Recipe`) that follows the advice.

    ``data`` is the recipe's ``data:`` section; without it only the reference model validates (its
    built-in shapes are the default), so a page fills it from the data the user picked.
    """
    data = dict(data or {})
    if advice.recovery_mode != "none" and "train" in data:
        train = data["train"] if isinstance(data["train"], dict) and "source" in data["train"] else {
            "source": data["train"]}
        data["train"] = {**train, "fraction": advice.data_fraction}
    if "eval" not in data and source == "reference":
        data["eval"] = {"source": "shapes", "samples": eval_samples}
    if source == "reference" and advice.recovery_mode != "none" and "train" not in data:
        data["train"] = {"source": "shapes", "fraction": advice.data_fraction}
    return {"model": source, "prune": {"method": advice.method, "ratio": round(ratio, 4)},
            "recovery": {"mode": advice.recovery_mode, "distillation": advice.distillation}, "data": data}
