"""Export: a finished run as a Hugging Face folder under cache/exports/<name>, with its model card,
a zip download when small, and the exact code that loads it."""
import streamlit as st

from compression.paths import cache_dir
from compression.runs import export, jobs
from ui import common, views

common.page_header("Export", "A finished run as a self-contained Hugging Face folder (safetensors, config, processor, "
                   "recipe, metrics, model card), checked by reloading it in a fresh process.")
runs = [r["name"] for r in jobs.list_runs()]
if not runs:
    st.info("No finished runs yet: launch a job on the Compress page.")
    st.stop()

left, right = st.columns(2)
with left:
    run = common.run_picker("Run", runs, key="export_run")
name = right.text_input("Export name (a folder under cache/exports)", value=run, key=f"export_name_{run}")
with common.shown_as_message():
    name = export.sanitize_name(name)
destination = cache_dir() / "exports" / name
exists = (destination / "config.json").is_file()
overwrite = st.checkbox("Overwrite the existing export", value=False, key="export_overwrite") if exists else False
if st.button("Export", type="primary", disabled=exists and not overwrite):
    with st.spinner("Writing the folder and reloading it in a fresh process to check its logits…"), \
            common.shown_as_message():
        destination = export.export_run(run, name, overwrite=overwrite)
    st.success(f"Exported to `{destination}`")
    exists = True
elif exists:
    st.caption(f"`{destination}` exists (exported earlier).")

if exists:
    checked = export.check_summary(destination)
    if checked:
        st.caption(checked)
    st.subheader("Load it")
    st.code(views.load_snippet(destination), language="python")
    zip_file = export.zip_path_for(destination)
    if zip_file is not None:
        st.download_button(f"Download {zip_file.name} ({zip_file.stat().st_size / 1e6:.1f} MB)",
                           zip_file.read_bytes(), zip_file.name, "application/zip", key="export_zip")
    else:
        st.caption(f"No zip: the folder is over {export.ZIP_LIMIT_BYTES / 1024 ** 2:.0f} MB; copy `{destination}`.")
    st.subheader("Model card (README.md)")
    with st.container(border=True):
        st.markdown((destination / "README.md").read_text().split("---", 2)[-1])
    with st.expander("Files"):
        st.dataframe([{"file": str(f.relative_to(destination)), "MB": round(f.stat().st_size / 1e6, 3)}
                      for f in sorted(destination.rglob("*")) if f.is_file()], hide_index=True)
