"""The CLI contract for eval / ask / models: JSON keys, and one line + exit code 2 on bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from compression.cli.main import main
from tests.tiny import save_tiny

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny", "llama", "clip")


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "img.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(path)
    return path


def run_cli(*args):
    return main(list(args))


def test_eval_json_keys(tiny_folder, capsys):
    assert run_cli("eval", "--model", str(tiny_folder), "--data", "shapes", "--samples", "5", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("accuracy", "per_type", "params_total", "params_language", "size_bytes", "prefill_ms",
                "decode_tokens_per_s", "metric", "data", "prompt"):
        assert key in out
    assert out["data"] == "5 records of ShapesVQA (test)" and out["samples"] == 5
    assert out["prefill_ms"] > 0 and 0 <= out["accuracy"] <= 1 and out["params_language"] < out["params_total"]


def test_ask_json_keys(tiny_folder, image, capsys):
    assert run_cli("ask", "--model", str(tiny_folder), "--image", str(image), "--question", "how many shapes are there ?",
                   "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["answer"], str) and out["latency_ms"] > 0


def test_models_lists_reference(capsys):
    assert run_cli("models", "--json") == 0
    rows = json.loads(capsys.readouterr().out)["models"]
    assert rows[0] == {"name": "reference", "kind": "reference", "path": rows[0]["path"]}
    assert all({"name", "kind", "path"} <= set(r) for r in rows)


def test_bad_input_exits_2_with_one_line(tiny_folder, image, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "corrupt.png").write_bytes(Image.new("RGB", (8, 8)).tobytes()[:10])
    unsupported = tmp_path / "unsupported"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    (tmp_path / "folder.png").mkdir()
    cases = [
        (["eval", "--model", str(tmp_path / "missing"), "--data", "shapes"], "does not exist"),
        (["eval", "--model", str(unsupported), "--data", "shapes"], "unsupported architecture 'whisper'"),
        (["eval", "--model", str(tiny_folder), "--samples", "0"], "--samples 0 must be at least 1"),
        (["eval", "--model", str(tiny_folder)], "--data is required for model"),
        (["eval", "--model", str(tiny_folder), "--data", str(tmp_path / "nope.json")], "nope.json does not exist"),
        (["ask", "--model", str(tiny_folder), "--image", str(tmp_path / "folder.png"), "--question", "what ?"],
         "folder.png is a folder"),
        (["ask", "--model", str(tiny_folder), "--image", str(image), "--question", "what <image> is it ?"],
         "contains the image token '<image>'"),
        (["ask", "--model", str(tiny_folder), "--image", str(image), "--question", "what " * 200],
         "the model accepts at most 64 (max_position_embeddings)"),
        (["ask", "--model", str(tiny_folder), "--image", str(tmp_path / "notes.png"), "--question", "what ?"],
         "notes.png is not a readable image"),
        (["ask", "--model", str(tiny_folder), "--image", str(tmp_path / "corrupt.png"), "--question", "what ?"],
         "corrupt.png is not a readable image"),
        (["ask", "--model", str(tiny_folder), "--image", str(tmp_path / "gone.png"), "--question", "what ?"],
         "gone.png does not exist"),
        (["ask", "--model", str(tiny_folder), "--image", str(image), "--question", "  "], "--question is empty"),
        (["eval", "--model", "config:llava-1.5-7b", "--data", "shapes"], "is config-only"),
    ]
    for argv, message in cases:
        assert run_cli(*argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (argv, lines)


def test_bad_input_in_a_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "compression", "ask", "--model", str(tmp_path / "missing"),
                           "--image", "x.png", "--question", "q"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert errors == ["error: image x.png does not exist; expected a PNG or JPEG file"]
    assert "Traceback" not in proc.stderr
