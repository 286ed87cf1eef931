"""The live job list of the Compress page: polled with ``st.fragment(run_every=…)`` so only this
part of the page reruns; the selected job is mirrored in the query string (``?job=…``) so that a
refresh or a second tab reconnects to it. Jobs are rows of ``compression.runs.jobs`` (dicts)."""
from __future__ import annotations

from types import ModuleType
from typing import Any

import pandas as pd
import streamlit as st

JOB_KEY = "selected_job"
POLL_SECONDS = 2.0


def select(job_id: str) -> None:
    st.session_state[JOB_KEY] = job_id
    st.query_params["job"] = job_id


def selected() -> str | None:
    if JOB_KEY not in st.session_state and st.query_params.get("job"):
        st.session_state[JOB_KEY] = st.query_params["job"]
    return st.session_state.get(JOB_KEY)


def eta(seconds: float | None) -> str:
    if seconds is None or pd.isna(seconds):
        return ""
    seconds = int(seconds)
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([{
        "job": j["id"], "sweep": j.get("sweep") or "", "state": j["state"], "stage": j.get("stage") or "",
        "progress": j.get("progress") if j["state"] != "succeeded" else 1.0,
        "step": f"{j.get('step') or 0}/{j.get('total') or 0}" if j.get("total") else "",
        "loss": j.get("loss"), "ETA": eta(j.get("eta_s")) if j["state"] == "running" else "",
    } for j in rows])


def live_jobs(jobs: ModuleType) -> None:
    """The job table, the selected job's progress, its log, and cancel / resume, refreshed every 2 s."""

    @st.fragment(run_every=POLL_SECONDS)
    def poll() -> None:
        rows = jobs.list_jobs()
        if not rows:
            st.caption("No jobs yet: launch one with the form above.")
            return
        frame = table(rows)
        st.dataframe(frame, hide_index=True, key="job_table", column_config={
            "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
            "loss": st.column_config.NumberColumn(format="%.4f")})
        ids = frame["job"].tolist()
        current = selected()
        if current not in ids:
            current = ids[0]
            select(current)
        # the state is not in the option labels: a keyed selectbox keeps the labels it was first drawn with
        choice = st.selectbox("Job", ids, index=ids.index(current), key=f"job_choice_{current}")
        if choice != current:
            select(choice)
            st.rerun()
        detail(jobs, choice)

    poll()


def detail(jobs: ModuleType, job_id: str) -> None:
    try:
        job = jobs.get(job_id)
    except ValueError as e:
        st.error(str(e).splitlines()[0])
        return
    state, stage = job["state"], job.get("stage") or ""
    progress = 1.0 if state == "succeeded" else float(job.get("progress") or 0.0)
    loss = f" · loss {job['loss']:.4f}" if job.get("loss") is not None else ""
    st.progress(min(max(progress, 0.0), 1.0), text=f"**{state}** · {stage} · {progress:.0%}{loss}"
                + (f" · ETA {eta(job.get('eta_s'))}" if state == "running" and job.get("eta_s") else ""))
    if job.get("error") and state != "succeeded":
        st.error(str(job["error"]).splitlines()[0])
    if state == "succeeded":
        st.success(f"Finished: run `{job_id}` is on the Results, Compare and Export pages.")
    left, right, _ = st.columns([1, 1, 4])
    if left.button("Cancel", key=f"cancel_{job_id}", disabled=state not in ("queued", "running")):
        try:
            jobs.cancel(job_id)
            st.rerun()
        except ValueError as e:
            st.error(str(e).splitlines()[0])
    if right.button("Resume", key=f"resume_{job_id}", disabled=state not in ("failed", "cancelled")):
        try:
            jobs.resume(job_id)
            st.rerun()
        except ValueError as e:
            st.error(str(e).splitlines()[0])
    st.code(jobs.log_tail(job_id, 30) or "(no log yet)", language="text")
