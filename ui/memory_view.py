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


def plan_table(plan: dict, device_label: str) -> None:
    """Each stage's predicted peak by part (GiB), whether it fits the device, and what would make it fit."""
    import pandas as pd

    rows = []
    for stage, parts in plan["stages"].items():
        rows.append({"stage": stage, **{k: round(v / GIB, 2) for k, v in parts.items()}})
    st.dataframe(pd.DataFrame(rows).set_index("stage"), width="stretch")
    device = plan.get("device_bytes")
    where = f"{device_label}, {device / GIB:.1f} GiB" if device else device_label
    peak = plan["peak_bytes"] / GIB
    if plan["fits"] is None:
        st.caption(f"**Estimated** peak {peak:.2f} GiB ({plan['dtype']}, {plan['sequence_tokens']} tokens a sample); "
                   "the device's memory is unknown")
    elif plan["fits"]:
        st.caption(f"**Estimated** peak {peak:.2f} GiB: fits {where} ({plan['dtype']}, "
                   f"{plan['sequence_tokens']} tokens a sample)")
    else:
        st.warning(f"Estimated peak {peak:.2f} GiB does not fit {where}. Would fit: {plan['suggestion']}")
