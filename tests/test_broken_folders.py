"""Every way a model folder can be broken gets one line naming the file and what was expected, from
``compression.models.load`` (``ModelLoadError``) and from the CLI (exit code 2, no traceback); nothing is
half-loaded: header-level faults are refused before the weights are read."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compression import models
from compression.cli.main import main
from compression.models import loader
from tests.tiny import tiny_config, tiny_llava, tiny_processor

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A whole tiny folder, the same model in three shards, and a tied-embeddings one."""
    from transformers import LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("broken")
    model, processor, _ = tiny_llava("llama", "clip")
    whole, sharded = root / "whole", root / "sharded"
    model.save_pretrained(whole)
    processor.save_pretrained(whole)
    model.save_pretrained(sharded, max_shard_size="150KB")
    processor.save_pretrained(sharded)
    config = tiny_config("llama", "clip")
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    tied = root / "tied"
    LlavaForConditionalGeneration(config).save_pretrained(tied)
    tiny_processor("clip").save_pretrained(tied)
    return {"whole": whole, "sharded": sharded, "tied": tied}


def _copy(folders, tmp_path, which="whole") -> Path:
    return Path(shutil.copytree(folders[which], tmp_path / which))


def _edit_config(folder: Path, **text_fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(text_fields)
    (folder / "config.json").write_text(json.dumps(config))


def _drop_weight(folder: Path, fragment: str) -> str:
    tensors = load_file(folder / "model.safetensors")
    key = next(k for k in tensors if fragment in k)
    del tensors[key]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return key


def _truncate(folder: Path) -> None:
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _corrupt_header(folder: Path) -> None:
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"#" * 32  # the JSON header starts after the 8-byte length
    f.write_bytes(bytes(data))


def _refused(source: Path, match: str, monkeypatch=None, before_weights: bool = True) -> str:
    """Load ``source``, expect one ``ModelLoadError`` line matching ``match``; return it."""
    if monkeypatch is not None and before_weights:
        def must_not_read(*args, **kwargs):
            raise AssertionError("the weights were read although the headers already showed the fault")

        monkeypatch.setattr(loader, "_load_weights", must_not_read)
    with pytest.raises(models.ModelLoadError, match=match) as err:
        models.load(str(source))
    assert "\n" not in str(err.value)
    return str(err.value)


def test_the_unbroken_folders_load(folders):
    for which in ("whole", "sharded"):
        loaded = models.load(str(folders[which]))
        assert loaded.has_weights and loaded.kind == "local"
    assert len(list(folders["sharded"].glob("model-*.safetensors"))) >= 3
    tied = models.load(str(folders["tied"])).model
    with open(folders["tied"] / "model.safetensors", "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    assert "lm_head.weight" not in header  # stored once, under the embeddings: not "missing"
    assert torch.equal(tied.lm_head.weight, tied.get_input_embeddings().weight)


def test_truncated_weights_are_refused_before_reading(folders, tmp_path, monkeypatch):
    folder = _copy(folders, tmp_path)
    _truncate(folder)
    line = _refused(folder, r"model\.safetensors cannot be read \(.*truncated\); expected complete "
                            "LlavaForConditionalGeneration weights", monkeypatch)
    assert str(folder / "model.safetensors") in line


def test_corrupt_header_is_refused(folders, tmp_path, monkeypatch):
    folder = _copy(folders, tmp_path)
    _corrupt_header(folder)
    _refused(folder, r"model\.safetensors cannot be read \(.*invalid JSON in header.*corrupt\)", monkeypatch)
    (folder / "model.safetensors").write_bytes(b"\x00\x00")
    _refused(folder, r"model\.safetensors cannot be read \(.*\); expected complete", monkeypatch)


def test_missing_shard_named_by_the_index(folders, tmp_path, monkeypatch):
    folder = _copy(folders, tmp_path, "sharded")
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[1].unlink()
    _refused(folder, rf"model\.safetensors\.index\.json names shard {shards[1].name}, which is not in .*; expected "
                     rf"all {len(shards)} shards it lists", monkeypatch)
    for shard in shards:  # every shard gone: still a weights folder, not a what-if config
        shard.unlink(missing_ok=True)
    _refused(folder, "names shard model-00001", monkeypatch)


def test_config_that_disagrees_with_the_weights_shapes(folders, tmp_path, monkeypatch):
    folder = _copy(folders, tmp_path)
    _edit_config(folder, intermediate_size=128)  # the weights are 96 wide
    line = _refused(folder, "the config disagrees with the weights", monkeypatch)
    assert "mlp" in line and "[64, 96]" in line and "[64, 128]" in line and "config.json" in line


def test_missing_weight_is_refused_not_initialised_at_random(folders, tmp_path, monkeypatch):
    folder = _copy(folders, tmp_path)
    _drop_weight(folder, "layers.1.mlp.up_proj")
    _refused(folder, r"lacks 1 weight\(s\) .*config\.json implies, e.g. model\.language_model\.layers\.1\.mlp\.up_proj"
                     r"\.weight", monkeypatch)


def test_config_with_fewer_layers_than_the_weights(folders, tmp_path):
    folder = _copy(folders, tmp_path)
    _edit_config(folder, num_hidden_layers=2)  # the weights hold 3 layers: transformers would drop one silently
    line = _refused(folder, r"holds \d+ weight\(s\) .*config\.json has no place for, e.g. .*layers\.2\.")
    assert int(line.split("holds ")[1].split()[0]) == 9  # 4 attention + 3 MLP projections + 2 norms


def test_loading_report_is_the_safety_net_when_headers_are_not_checked(folders, tmp_path, monkeypatch):
    """Folders in a naming the header check cannot follow are checked from transformers' loading report."""
    monkeypatch.setattr(loader, "check_against_model", lambda *args: False)
    folder = _copy(folders, tmp_path)
    _drop_weight(folder, "layers.0.self_attn.q_proj")
    _refused(folder, r"lacks 1 weight\(s\) .*e\.g\. model\.language_model\.layers\.0\.self_attn\.q_proj\.weight")
    folder = Path(shutil.copytree(folders["whole"], tmp_path / "wide"))
    _edit_config(folder, intermediate_size=128)
    line = _refused(folder, r"the config disagrees with the weights \(9 tensor\(s\)\)")
    assert "[64, 96]" in line or "[96, 64]" in line


def test_missing_tokenizer_and_processor_files(folders, tmp_path, monkeypatch):
    folder = _copy(folders, tmp_path)
    (folder / "tokenizer.json").unlink()
    _refused(folder, r"has no tokenizer \(tokenizer\.json, tokenizer\.model, vocab\.json.*\); expected the model's "
                     "tokenizer files beside config.json", monkeypatch)
    folder = Path(shutil.copytree(folders["whole"], tmp_path / "no-processor"))
    (folder / "processor_config.json").unlink()
    _refused(folder, r"no-processor has no image processor config \(preprocessor_config\.json", monkeypatch)


def test_config_not_json_and_unsupported_architecture(folders, tmp_path, monkeypatch):
    folder = _copy(folders, tmp_path)
    (folder / "config.json").write_text('{"model_type": "llava",')
    _refused(folder, r"config\.json is not valid JSON \(.*\); expected a Hugging Face config\.json", monkeypatch)
    (folder / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    _refused(folder, r"unsupported architecture 'blip-2'; supported: LLaVA \('llava'\)", monkeypatch)


@pytest.mark.parametrize("breakage, message", [
    (_truncate, "model.safetensors cannot be read"),
    (_corrupt_header, "model.safetensors cannot be read"),
    (lambda f: _edit_config(f, intermediate_size=128), "the config disagrees with the weights"),
    (lambda f: _drop_weight(f, "layers.2.mlp.down_proj"), "lacks 1 weight(s)"),
    (lambda f: (f / "tokenizer.json").unlink(), "has no tokenizer"),
    (lambda f: (f / "config.json").write_text("{"), "is not valid JSON"),
    (lambda f: (f / "config.json").write_text('{"model_type": "blip-2"}'), "unsupported architecture 'blip-2'"),
])
def test_cli_eval_exits_2_with_one_line(folders, tmp_path, capsys, breakage, message):
    folder = _copy(folders, tmp_path)
    breakage(folder)
    assert main(["eval", "--model", str(folder), "--data", "shapes", "--samples", "2", "--no-latency"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_cli_process_truncated_weights_no_traceback(folders, tmp_path):
    """The reported case end to end: a real process, exit 2, one line on stderr (it was a traceback, exit 1)."""
    folder = _copy(folders, tmp_path)
    _truncate(folder)
    proc = subprocess.run([sys.executable, "-m", "compression", "eval", "--model", str(folder), "--data", "shapes",
                           "--samples", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.safetensors cannot be read" in lines[0] and "Traceback" not in proc.stderr
