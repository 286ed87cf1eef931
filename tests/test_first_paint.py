"""First paint before torch (issue 12): every page draws its title and sidebar (links, model picker)
before torch or transformers is imported, so the dashboard is on screen while they load, which takes
seconds on CPU. The browser timing itself is ``benchmarks/bench_ui.py``.

Runs in a fresh interpreter, since this test process imported torch long ago: each page runs under
AppTest with ``ui.common.page_header`` wrapped to note, once the header is drawn, which of torch and
transformers are imported, then stop the page.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, sys
from pathlib import Path

import streamlit as st
from streamlit.testing.v1 import AppTest

from ui import common

draw_header = common.page_header
heavy_at_header = []


def header_then_stop(title, purpose):
    draw_header(title, purpose)
    heavy_at_header.append([m for m in ("torch", "transformers") if m in sys.modules])
    st.stop()


common.page_header = header_then_stop
seen = []


def record(at, name):
    seen.append({"page": name, "title": [t.value for t in at.title], "pickers": [r.key for r in at.sidebar.radio],
                 "exceptions": [e.value for e in at.exception], "heavy": heavy_at_header[-1]})


# the Model page with each kind of source whose picker lists names (reference, shipped configs, runs)
for source in ("reference", "config:llava-1.5-7b", "run:none-yet"):
    at = AppTest.from_file("app.py", default_timeout=120)
    at.session_state["model_source"] = source
    record(at.run(), f"app.py ({source})")
for page in sorted(Path("pages").glob("*.py")):
    record(at.switch_page(str(page)).run(), str(page))
print(json.dumps(seen))
"""


def test_every_page_paints_its_header_before_importing_torch():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    pages = sorted(p.name for p in (ROOT / "pages").glob("*.py"))
    assert [s["page"] for s in seen][3:] == [f"pages/{p}" for p in pages]
    for s in seen:
        assert not s["exceptions"], s
        assert len(s["title"]) == 1 and "picker_kind" in s["pickers"], s  # the header: title, model picker
    assert [s["title"][0] for s in seen[:3]] == ["Model"] * 3
    heavy = {s["page"]: s["heavy"] for s in seen if s["heavy"]}
    assert not heavy, f"imported before the page's header was drawn: {heavy}"
