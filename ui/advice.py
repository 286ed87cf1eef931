"""The paper's decision flow: which pruning paradigm and recovery to use for a budget.

Huang et al., "Investigating Structural Pruning and Recovery Techniques for Compressing MLLMs"
(arXiv 2507.20749), as summarised in shared/DESIGN.md:

- no recovery budget -> widthwise pruning (it degrades more gracefully untrained);
- <= 15 % removed with recovery -> layerwise + projector-only finetuning;
- 15-30 % -> layerwise + SFT with hidden-state L2 distillation ("SFT + L2 KD");
- beyond 30 % (the paper measures 45 % and 60 %) -> widthwise + SFT + L2 KD, with more data.

``fit_to_device`` checks full finetuning against the device's memory (``compression.measure.memory_plan``) and
advises LoRA (with gradient checkpointing if need be) when full finetuning does not fit but LoRA does, naming the
predicted peaks and the device's size. ``recipe_for`` turns the advice into a raw recipe (validated by :class:`compression.runs.recipe.Recipe`) to prefill the
Compress form. No streamlit here.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
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
    gradient_checkpointing: bool = False

    @property
    def summary(self) -> str:
        paradigm = "layerwise" if self.method == "layer" else "widthwise"
        if self.recovery_mode == "none":
            return f"{paradigm} pruning, no recovery"
        training = {"projector": "projector-only finetuning", "lora": "LoRA on the language model + projector",
                    "full": "full language-model finetuning"}[self.recovery_mode]
        kd = " with hidden-state L2 distillation (SFT + L2 KD)" if self.distillation == "hidden" else ""
        checkpointing = ", gradient checkpointing on" if self.gradient_checkpointing else ""
        return (f"{paradigm} pruning, then {training}{kd} on {self.data_fraction:.0%} of the training data"
                f"{checkpointing}")


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


def fit_to_device(advice: Advice, source, device_bytes: int | None, dtype: str, plan=None, batch_size: int = 16,
                  device_label: str = "the device") -> Advice:
    """``advice`` checked against a device of ``device_bytes`` (None: unknown, unchanged): when it says full
    finetuning and full finetuning's predicted recovery peak does not fit (even with gradient checkpointing), LoRA
    (with gradient checkpointing when only that fits); the reason then names the predicted peaks and the device.

    ``source`` is the model (a ``LoadedModel``, config-only is enough), ``plan`` the pruning plan the advice implies
    (the student's shapes), ``dtype`` the precision it trains in, ``batch_size`` the recipe's (default 16).
    Estimates from ``compression.measure.memory_plan.recovery_choice``."""
    from compression.measure.memory_plan import HEADROOM, recovery_choice

    if advice.recovery_mode != "full" or device_bytes is None:
        return advice
    fit = recovery_choice(source, device_bytes, dtype, advice.distillation, batch_size, plan)
    gib = {(o["mode"], o["gradient_checkpointing"]): f"{o['peak_bytes'] / 2**30:.1f} GiB" for o in fit["options"]}
    where = (f"{device_label} ({device_bytes / 2**30:.1f} GiB, {HEADROOM:.0%} of it usable: "
             f"{fit['budget_bytes'] / 2**30:.1f} GiB)")
    basis = f"(estimated: {dtype}, batch {batch_size} of {fit['sequence_tokens']} tokens)"
    choice = fit["choice"]
    if choice is None:
        return replace(advice, reason=f"{advice.reason} Memory: full finetuning is predicted to peak at "
                                      f"{gib['full', False]} and even LoRA with gradient checkpointing at "
                                      f"{gib['lora', True]}, more than {where} {basis}: use several GPUs (FSDP) "
                                      "or a larger device.")
    if choice["mode"] == "full":
        if not choice["gradient_checkpointing"]:
            return advice
        return replace(advice, gradient_checkpointing=True,
                       reason=f"{advice.reason} Memory: full finetuning is predicted to peak at {gib['full', False]}, "
                              f"more than {where}; with gradient checkpointing at {gib['full', True]}, which fits "
                              f"{basis}.")
    lora = ("lora", choice["gradient_checkpointing"])
    how = "LoRA with gradient checkpointing" if choice["gradient_checkpointing"] else "LoRA"
    return replace(advice, recovery_mode="lora", gradient_checkpointing=choice["gradient_checkpointing"],
                   reason=f"{advice.reason} Memory: full finetuning is predicted to peak at {gib['full', False]} "
                          f"({gib['full', True]} with gradient checkpointing), more than {where}; {how} at "
                          f"{gib[lora]} fits {basis}.")


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
    recovery = {"mode": advice.recovery_mode, "distillation": advice.distillation}
    if advice.gradient_checkpointing:
        recovery["gradient_checkpointing"] = True
    return {"model": source, "prune": {"method": advice.method, "ratio": round(ratio, 4)}, "recovery": recovery,
            "data": data}


# ------------------------------------------------------------------------------------------- budget answer

@dataclass(frozen=True)
class BudgetAnswer:
    source: str          # who answered: the measured front of a sweep, or the paper's decision flow
    text: str
    run: str | None = None  # the measured run recommended, when the front answered


def budget_answer(points: list[dict] | None, size_fraction: float, compute: Compute = "some",
                  front_label: str = "the sweep") -> BudgetAnswer:
    """'Which recipe for my budget?': the most accurate measured point within ``size_fraction`` of
    the original's weights when ``points`` (a sweep's rows, ``compression.runs.sweep.points``) are
    given, else the paper's decision flow for removing ``1 - size_fraction`` of the language model.
    ``compute == "none"`` keeps only points made without recovery training."""
    from compression.runs import sweep

    if not 0 < size_fraction < 1:
        raise ValueError(f"size budget {size_fraction} must be in (0, 1): the share of the original's weights kept")
    originals = [p for p in points or [] if p["kind"] == "original"]
    if not originals:
        advice = decision_flow(1 - size_fraction, compute=compute)
        return BudgetAnswer("the paper's decision flow (no measured sweep of this model)",
                            f"{advice.summary}. {advice.reason} Removing {1 - size_fraction:.0%} of the language "
                            f"model stands in for keeping {size_fraction:.0%} of the weights.")
    original = originals[0]
    limit = size_fraction * original["size_bytes"]
    best = sweep.best_within(points, max_size_bytes=limit, trained=compute != "none")
    source = f"the measured front of {front_label}"
    if best is None:
        smallest = min(points, key=lambda p: p["size_bytes"])
        return BudgetAnswer(source, f"No measured run fits in {limit / 1e6:.2f} MB ({size_fraction:.0%} of the "
                                    f"original); the smallest is `{smallest['name']}` at "
                                    f"{smallest['size_bytes'] / 1e6:.2f} MB. Widen the sweep's ratios.")
    kept = best["accuracy"] / original["accuracy"] if original["accuracy"] else float("nan")
    return BudgetAnswer(source, f"`{best['name']}` ({best['recipe']}): accuracy {best['accuracy']:.1%} "
                                f"({kept:.1%} of the original's {original['accuracy']:.1%}), "
                                f"{best['size_bytes'] / 1e6:.2f} MB ({best['size_bytes'] / original['size_bytes']:.0%} "
                                f"of the original), measured on {best['eval_samples']} test records.",
                        run=best["name"] if best["kind"] == "run" else None)
