"""Sweeps in the dashboard: the Sweep section of the Compress page (define, estimate, launch, follow,
cancel, resume) and the front of the Results page (a sweep's or a shipped study's measured points,
polled with ``st.fragment(run_every=…)`` while runs are still going; selecting a point makes it
the run Compare and Export open; "Which recipe for my budget?").

The library does the work (``compression.runs.sweep``, ``compression.runs.studies``); this module
only draws. Session state holds the sweep id (``results_sweep``) and the chosen run's name.
"""
from __future__ import annotations

import copy

import pandas as pd
import streamlit as st

from compression.runs import jobs, studies, sweep
from ui import advice, common, views

SWEEP_KEY = "results_sweep"   # "sweep:<id>" or "study:<name>": the sweep the Results page shows
POLL_SECONDS = 3.0
RATIOS = [0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6]


def show(key: str) -> None:
    st.session_state[SWEEP_KEY] = key


# ------------------------------------------------------------------------------------------- Compress: define and launch

def builder(source: str, has_weights: bool, eval_data, train_data) -> None:
    """The Sweep section of the Compress page; ``eval_data`` / ``train_data``: the data sources the
    page picked (the sidebar's evaluation data, the form's training data), each a recipe ``source`` value."""
    st.subheader("Sweep")
    st.caption("A grid of recipes run as one group of jobs. They share the original's importance scores and "
               "accuracy (measured once); Results draws their Pareto front as they finish.")
    if eval_data is None or not train_data:
        st.caption(f"Pick the data to evaluate `{source}` on in the sidebar to define a sweep." if eval_data is None
                   else "Name the training data in the form above to define a sweep: it calibrates the importance "
                        "scores (and trains any recovery).")
        follow()
        return
    default = _default_spec(source, eval_data, train_data)
    how = st.radio("Define the grid", ["Pick the axes", "Paste a spec (YAML)"], horizontal=True, key="sweep_how")
    try:
        if how == "Pick the axes":
            spec = sweep.SweepSpec.from_dict(_picked_spec(default))
        else:
            text = st.text_area("Sweep spec", value=sweep.SweepSpec.from_dict(default).to_yaml(),
                                height=220, key="sweep_yaml",
                                help="name, base (a recipe) and axes; the file `python -m compression sweep` takes")
            spec = sweep.SweepSpec.from_yaml(text)
        points = spec.points()
        sweep.check_budgets(points)
    except ValueError as e:
        st.error(common.one_line(e))
        return
    estimate = sweep.estimate(points)
    st.markdown(f"**{estimate.runs} runs**, about **{sweep.human_seconds(estimate.seconds)}** of wall time")
    st.caption(f"Estimate {estimate.basis}.")
    confirmed = True
    if len(points) > sweep.MAX_RUNS:
        confirmed = st.checkbox(f"{len(points)} runs is over {sweep.MAX_RUNS}: launch them all", key="sweep_yes")
    if how == "Pick the axes":
        with st.expander("Spec as YAML (the file `python -m compression sweep SPEC` takes)"):
            st.code(spec.to_yaml(), language="yaml")
    if st.button("Launch sweep", type="primary", disabled=not has_weights or not confirmed, key="sweep_launch"):
        try:
            sweep_id = sweep.launch(spec, yes=confirmed)
        except ValueError as e:
            st.error(common.one_line(e))
            return
        show(f"sweep:{sweep_id}")
        st.toast(f"Sweep {sweep_id} launched: {len(points)} runs")
    follow()


def _default_spec(source: str, eval_data, train_data) -> dict:
    """The grid the section opens with: both paradigms x 15 / 30 / 40 % x no recovery or SFT + L2 KD
    (widthwise 50 % is more than the paper's eligible layers of the reference model hold)."""
    data = {"train": {"source": train_data, "fraction": 0.05}, "calibration": {"source": train_data, "samples": 10},
            "eval": {"source": eval_data, "samples": 200}}
    return {"name": "sweep", "base": {"model": source, "recovery": {"max_steps": 40}, "data": data},
            "axes": {"prune.method": ["layer", "width"], "prune.ratio": [0.15, 0.3, 0.4],
                     "recovery": ["none", "sft+hidden"]}}


def _picked_spec(default: dict) -> dict:
    base, axes = copy.deepcopy(default["base"]), default["axes"]
    data = base["data"]
    c1, c2, c3 = st.columns(3)
    methods = c1.multiselect("Pruning methods", ["layer", "width"], default=axes["prune.method"], key="sweep_methods")
    ratios = c1.multiselect("Fractions of the language model removed", RATIOS, default=axes["prune.ratio"],
                            key="sweep_ratios")
    recoveries = c2.multiselect("Recoveries", list(sweep.RECOVERY_PRESETS), default=axes["recovery"],
                                key="sweep_recoveries", help="sft+hidden = full finetuning with hidden-state L2 "
                                                             "distillation (the paper's best), on the training "
                                                             "data named in the form above")
    data["train"]["fraction"] = float(c2.number_input("Recovery data fraction", 0.0001, 1.0, data["train"]["fraction"],
                                                      0.01, format="%.4f", key="sweep_fraction"))
    base["recovery"]["max_steps"] = int(c3.number_input("Max recovery steps (0 = one full epoch)", 0, 100_000,
                                                        base["recovery"]["max_steps"], key="sweep_steps")) or None
    data["eval"]["samples"] = int(c3.number_input("Evaluation records per run", 1, 100_000, data["eval"]["samples"],
                                                  key="sweep_questions"))
    name = c3.text_input("Sweep name", value=default["name"], key="sweep_name")
    return {"name": name.strip(), "base": base,
            "axes": {"prune.method": methods, "prune.ratio": sorted(ratios), "recovery": recoveries}}


def follow() -> None:
    """The newest sweep's progress with Cancel / Resume for the whole group, polled."""

    @st.fragment(run_every=POLL_SECONDS)
    def poll() -> None:
        sweeps = jobs.list_sweeps()
        if not sweeps:
            return
        chosen = st.session_state.get(SWEEP_KEY, "")
        current = next((s for s in sweeps if f"sweep:{s['id']}" == chosen), sweeps[0])
        counts = current["counts"]
        st.progress(current["finished"] / current["total"],
                    text=f"Sweep `{current['id']}`: {current['finished']} of {current['total']} finished "
                         f"({counts['succeeded']} succeeded, {counts['running']} running, {counts['queued']} queued, "
                         f"{counts['failed']} failed, {counts['cancelled']} cancelled)")
        left, right, link = st.columns([1, 1, 3])
        if left.button("Cancel sweep", key=f"sweep_cancel_{current['id']}",
                       disabled=counts["queued"] + counts["running"] == 0):
            _act(jobs.cancel_sweep, current["id"])
        if right.button("Resume sweep", key=f"sweep_resume_{current['id']}",
                        disabled=counts["failed"] + counts["cancelled"] == 0):
            _act(jobs.resume_sweep, current["id"])
        link.page_link("pages/results.py", label="Its front on the Results page", icon=":material/monitoring:")

    poll()


def _act(action, sweep_id: str) -> None:
    try:
        action(sweep_id)
    except ValueError as e:
        st.error(common.one_line(e))
        return
    st.rerun()


# ------------------------------------------------------------------------------------------- Results: the front

def front_section(source: str) -> None:
    """The Results page's sweep section: pick a sweep or shipped study, see its front, ask the budget question."""
    st.subheader("Sweeps: the measured front")
    sweeps, shipped = jobs.list_sweeps(), studies.shipped()
    options = [f"sweep:{s['id']}" for s in sweeps] + [f"study:{s['name']}" for s in shipped]
    if not options:
        st.caption("No sweep yet: define one in the Sweep section of the Compress page.")
        budget(None, source, "")
        return
    if st.session_state.get(SWEEP_KEY) not in options:
        show(options[0])
    key = st.selectbox("Sweep", options, key=SWEEP_KEY,
                       format_func=lambda k: k.replace("sweep:", "sweep ", 1).replace("study:", "shipped study ", 1))
    if key.startswith("study:"):
        study = next(s for s in shipped if s["name"] == key.removeprefix("study:"))
        _shipped_banner(study)
        draw(study, shipped=True, source=source)
        return
    sweep_id = key.removeprefix("sweep:")
    state = next(s for s in sweeps if s["id"] == sweep_id)
    done = state["finished"] == state["total"]

    @st.fragment(run_every=None if done else POLL_SECONDS)
    def live() -> None:
        result = sweep.results(sweep_id)
        st.progress(result["finished"] / result["total"],
                    text=f"{result['finished']} of {result['total']} runs finished "
                         f"({result['counts']['succeeded']} succeeded)"
                         + ("" if result["done"] else "; the charts update as runs finish"))
        draw(result, shipped=False, source=source)
        if result["done"] and not done:
            st.rerun()  # the whole page once more, now without polling

    live()


def _shipped_banner(study: dict) -> None:
    st.info(f"**Shipped study `{study['name']}`**: measured on {study['machine']} on {study['made']}, "
            f"{len(study['runs'])} runs in {sweep.human_seconds(study['wall_s'])}. It ships as metrics and recipes "
            "only (no weights), so its runs cannot be opened in Compare or Export until re-run here.")
    st.markdown("Made by:")
    st.code(study["command"], language="bash")
    left, right = st.columns([1, 3])
    if left.button("Re-run this study here", key=f"rerun_{study['name']}"):
        try:
            spec = sweep.SweepSpec.from_yaml(studies.STUDIES_DIR / study["name"] / "sweep.yaml")
            sweep_id = sweep.launch(spec, yes=True)
        except ValueError as e:
            st.error(common.one_line(e))
            return
        show(f"sweep:{sweep_id}")
        st.rerun()
    right.caption(f"or: `{study['rerun']}`")


def draw(result: dict, shipped: bool, source: str) -> None:
    """Both front charts, the chosen run, the points table and the budget answer for one sweep."""
    table = pd.DataFrame(sweep.points(result["runs"]))
    label = f"shipped study {result['name']}" if shipped else f"sweep {result['id']}"
    if table.empty:
        st.caption("No run has finished yet.")
        budget(None, source, label)
        return
    chosen = st.session_state.get(common.CHOSEN_RUN)
    left, right = st.columns(2)
    picks = []
    for column, cost, title in ((left, "size_bytes", "Accuracy vs size (measured; hollow: what-if)"),
                                (right, "prefill_ms", "Accuracy vs prefill latency (measured; hollow: what-if)")):
        front = result["fronts"]["size" if cost == "size_bytes" else "prefill_ms"]
        with column:
            event = st.plotly_chart(views.front_chart(table, cost, front, title, chosen), on_select="rerun",
                                    selection_mode="points", key=f"front_{cost}_{label}")
        picks += [p["customdata"][0] for p in (event.selection.points if event else []) if p.get("customdata")]
    st.caption("Red dotted line and rings: the Pareto front (no other point is both at most as large or as slow and at "
               "least as accurate). Hollow grey: the what-if estimate of the same run (the roofline's after / before "
               "ratio applied to the measured original), joined to its measurement. Colour: pruning method; shape: "
               f"recovery ({views.recovery_legend()}). Click a point to choose it.")
    runs = [n for n in table.loc[table["kind"] == "run", "name"]]
    picked = next((p for p in picks if p in runs), None)
    if picked and picked != chosen:
        common.choose_run(picked)
        chosen = picked
    if shipped:
        if chosen in runs:
            st.caption(f"Chosen: `{chosen}` (shipped: no weights here; re-run the study to compare or export it).")
    else:
        available = {r["name"] for r in jobs.list_runs()}
        names = [n for n in runs if n in available]
        if names:
            common.run_picker("Run for Compare and Export", names, key=f"front_pick_{label}")
            chosen = st.session_state.get(common.CHOSEN_RUN)
            st.caption(f"Compare and Export open `{chosen}`." if chosen in names else
                       "Click a point, or pick a run here, to open it in Compare and Export.")
    with st.expander("Points (measured, with the what-if beside each)"):
        st.dataframe(views.front_table(table, result["fronts"]), hide_index=True, column_config={
            "accuracy": st.column_config.NumberColumn(format="percent"),
            "size MB": st.column_config.NumberColumn(format="%.2f"),
            "size MB (what-if)": st.column_config.NumberColumn(format="%.2f"),
            "prefill ms": st.column_config.NumberColumn(format="%.1f"),
            "prefill ms (what-if)": st.column_config.NumberColumn(format="%.1f")})
    budget(table[table["model"] == source].to_dict("records") or None, source, label, choosable=not shipped)


def budget(points: list[dict] | None, source: str, label: str, choosable: bool = False) -> None:
    st.markdown("#### Which recipe for my budget?")
    left, right = st.columns(2)
    fraction = left.slider("Keep at most this share of the original's weights", 0.3, 0.95, 0.8, 0.05,
                           key=f"budget_size_{label}")
    compute = right.selectbox("Training you can afford", list(advice.COMPUTE_CHOICES),
                              format_func=advice.COMPUTE_CHOICES.get, index=1, key=f"budget_compute_{label}")
    answer = advice.budget_answer(points, fraction, compute, label)
    st.markdown(f"**Answered from {answer.source}.** {answer.text}")
    if choosable and answer.run is not None and st.button("Choose it for Compare and Export", key=f"budget_choose_{label}"):
        common.choose_run(answer.run)
        st.rerun()
