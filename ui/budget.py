"""The budget the user set on the Budget & what-if page, kept in session state under a plain key.

Streamlit forgets a widget's state when its page is not shown, so the page copies its choices
here; other pages (Importance highlights what the budget removes, Compress prefills its form)
read them back.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import streamlit as st

KEY = "budget"


@dataclass
class Budget:
    mode: str = "fraction of language-model parameters"
    ratio: float = 0.30                 # fraction of language-model parameters removed
    target_mb: float | None = None
    dtype: str = "fp32"
    data_fraction: float = 0.05         # the paper's headline setting
    compute: str = "some"
    hardware: str = "cpu"


def current() -> Budget:
    return Budget(**st.session_state.get(KEY, {}))


def remember(**values) -> None:
    st.session_state[KEY] = asdict(Budget(**{**asdict(current()), **values}))
