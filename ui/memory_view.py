"""The memory plan before launch (``compression.measure.memory_plan``) on the sidebar's hardware (the
device's memory from ``compression.hardware.device_memory``), drawn as a table of stages."""
from __future__ import annotations

import streamlit as st

GIB = 2**30


def plan(loaded, recipe) -> dict:
    from compression.hardware import device_memory, resolve
    from compression.measure.memory_plan import plan_for_recipe

    chosen = resolve(recipe.hardware.device, recipe.hardware.dtype)
    total, _ = device_memory(chosen)
    return plan_for_recipe(loaded, recipe, total, chosen.dtype_name)


def fit_advice(suggestion, loaded, plan=None):
    """The paper's advice checked against the sidebar's device (``ui.advice.fit_to_device``): LoRA instead of
    full finetuning when only LoRA is predicted to fit."""
    from compression.hardware import device_memory, resolve
    from ui import common
    from ui.advice import fit_to_device

    chosen = resolve(*common.current_hardware())
    total, _ = device_memory(chosen)
    return fit_to_device(suggestion, loaded, total, chosen.dtype_name, plan=plan, device_label=chosen.label)


def plan_table(plan: dict, device_label: str) -> None:
    """Each stage's predicted peak by part (GiB), whether it fits the device, and what would make it fit."""
    import pandas as pd

    order = ["weights", "gradients", "optimizer", "activations", "logits", "kv_cache", "teacher", "total"]
    small = plan["peak_bytes"] < GIB
    unit, scale = ("MiB", 2**20) if small else ("GiB", GIB)
    rows = [{"stage": stage, **{part: round(parts[part] / scale, 1 if small else 2) if part in parts else None
                                for part in order}} for stage, parts in plan["stages"].items()]
    frame = pd.DataFrame(rows).set_index("stage").dropna(axis=1, how="all")
    st.dataframe(frame.rename(columns=lambda c: f"{c.replace('_', ' ')} ({unit})"), width="stretch")
    device = plan.get("device_bytes")
    where = f"the device ({device_label}: {device / GIB:.1f} GiB)" if device else f"the device ({device_label})"
    peak = f"{plan['peak_bytes'] / scale:.1f} {unit}" if small else f"{plan['peak_bytes'] / GIB:.2f} GiB"
    how = f"in {plan['dtype']}, {plan['sequence_tokens']} tokens a sample; the runtime's own memory comes on top"
    if plan["fits"] is None:
        st.caption(f"**Estimated** peak {peak} ({how}); the device's memory is unknown")
    elif plan["fits"]:
        st.caption(f"**Estimated** peak {peak}: fits {where} ({how})")
    else:
        st.warning(f"Estimated peak {peak} does not fit {where}. Would fit: {plan['suggestion']}")
