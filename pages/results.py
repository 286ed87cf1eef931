"""Results: a sweep's (or a shipped study's) measured Pareto front, live while it runs, with the
budget question answered from it; then every finished run against its original — accuracy vs
size and vs latency, per-question-type accuracy, the what-if estimate against the measurement, and a CSV."""
import streamlit as st

from compression.runs import jobs

from ui import common, sweep_view, views

common.page_header("Results", "Every finished run against the original it was compressed from. All numbers are "
                   "measured by the run's own evaluation unless a column says estimated.")
sweep_view.front_section(common.current_source())

st.divider()
st.subheader("Every finished run")
runs = jobs.list_runs()
if not runs:
    st.info("No finished runs yet: launch a job or a sweep on the Compress page.")
    st.stop()
frame = views.runs_frame(runs)
# accuracies on different data are not comparable: one front per evaluation set
measured_on = list(dict.fromkeys(frame.loc[frame["kind"] != "original", "measured on"].iloc[::-1]))
data = st.selectbox("Evaluation data", measured_on, key="results_data",
                    help="runs are compared only with runs (and the original) scored on the same records")
frame = frame[frame["measured on"] == data]
runs = [r for r in runs if views.measured_on(r) == data]
st.caption(f"Accuracy measured on **{data}**.")

left, right = st.columns(2)
left.plotly_chart(views.tradeoff_chart(frame, "size MB", "accuracy", "weights on disk (MB)",
                                       "Accuracy vs size (measured)"), key="acc_size")
right.plotly_chart(views.tradeoff_chart(frame, "prefill ms", "accuracy", "prefill latency (ms, batch 1)",
                                        "Accuracy vs latency (measured)"), key="acc_latency")
st.caption("Dotted line: the Pareto front — no other model is both smaller (or faster) and more accurate.")

st.subheader("Per record type")
per_type = views.per_type_frame(runs)
if per_type.empty:
    st.caption(f"The records of {data} carry no `type` field, so there is no per-type breakdown.")
else:
    chosen = st.multiselect("Models", per_type["model"].unique().tolist(),
                            default=per_type["model"].unique().tolist()[:4], key="results_models")
    st.plotly_chart(views.per_type_comparison(per_type[per_type["model"].isin(chosen)]), key="per_type")

st.subheader("What-if vs measured")
st.plotly_chart(views.what_if_vs_measured(frame), key="what_if_vs_measured")
common.estimated("x axis: the roofline what-if for this machine's CPU profile, computed when the run finished; "
                 "y axis: measured.")

st.subheader("Table")
st.dataframe(frame, hide_index=True, column_config={
    "accuracy": st.column_config.NumberColumn(format="percent"),
    "accuracy kept": st.column_config.NumberColumn(format="percent"),
    "params": st.column_config.NumberColumn(format="localized"),
    "size MB": st.column_config.NumberColumn(format="%.2f"),
    "prefill ms": st.column_config.NumberColumn(format="%.1f"),
    "decode tok/s": st.column_config.NumberColumn(format="%.0f")})
st.download_button("Download as CSV", frame.to_csv(index=False), "results.csv", "text/csv", type="primary")
