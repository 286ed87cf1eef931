"""Device and precision, chosen in one place: auto picks, and one line for what the machine does not have."""
import pytest
import torch

from compression.hardware import HardwareError, resolve


def test_auto_on_a_cpu_machine_is_the_cpu_in_fp32():
    hw = resolve()
    assert (hw.device, hw.dtype_name, hw.dtype) == ("cpu", "fp32", torch.float32)
    assert hw.label == "cpu, fp32" and hw.mixed_precision == "no"
    assert resolve("cpu", "bf16").dtype == torch.bfloat16 and resolve("cpu", "bfloat16").dtype_name == "bf16"


@pytest.mark.parametrize("device, dtype, message", [
    ("cuda", "auto", "device 'cuda': no GPU is visible (torch.cuda.device_count() == 0); available: cpu"),
    ("cuda:1", "bf16", "device 'cuda:1': no GPU is visible"),
    ("tpu", "auto", "device 'tpu' is not available; expected auto or one of cpu"),
    ("cpu", "fp16", "dtype 'fp16': cpu does not support fp16; available: bf16, fp32"),
    ("cpu", "int4", "dtype 'int4': expected one of auto, bf16, fp16, fp32"),
])
def test_what_is_not_there_is_one_line(device, dtype, message):
    with pytest.raises(HardwareError) as e:
        resolve(device, dtype)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_gpus_are_picked_by_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: ["NVIDIA T4", "NVIDIA A100"][i])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(7, 5), (8, 0)][i])
    hw = resolve()  # the first GPU, and the best precision it has (a T4 lacks bf16)
    assert (hw.device, hw.dtype_name, hw.mixed_precision) == ("cuda:0", "fp16", "fp16")
    assert hw.label == "cuda:0 (NVIDIA T4), fp16" and hw.is_gpu
    assert resolve("cuda:1").dtype_name == "bf16"
    with pytest.raises(HardwareError, match=r"dtype 'bf16': cuda:0 does not support bf16; available: fp16, fp32"):
        resolve("cuda", "bf16")
    with pytest.raises(HardwareError, match=r"device 'cuda:2': 2 GPU\(s\) are visible; available: cpu, cuda:0, cuda:1"):
        resolve("cuda:2")


@pytest.mark.parametrize("argv", [
    ["eval", "--model", "reference", "--samples", "2", "--no-latency", "--device", "cuda"],
    ["ask", "--model", "reference", "--data", "shapes", "--record", "0", "--device", "cuda"],
    ["analyze", "--model", "reference", "--kind", "layers", "--samples", "2", "--device", "cuda"],
    ["prune", "--model", "reference", "--method", "layer", "--ratio", "0.2", "--out", "OUT", "--device", "cuda"],
    ["run", "recipes/layer30-sft-hidden-kd.yaml", "--out", "OUT", "--device", "cuda"],
])
def test_cli_device_cuda_without_a_gpu_exits_2_with_one_line(argv, tmp_path, capsys):
    from compression.cli.main import main

    out = tmp_path / "out"
    argv = [str(out) if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: device 'cuda': no GPU is visible") and "available: cpu" in err
    assert len(err.splitlines()) == 1
    assert not out.exists()  # nothing written


def test_cli_prints_and_uses_the_chosen_precision(capsys):
    import json

    from compression.cli.main import main

    assert main(["ask", "--model", "reference", "--data", "shapes", "--record", "0", "--dtype", "bf16",
                 "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["answer"] and out["hardware"] == "cpu, bf16" and captured.err == ""
    assert main(["ask", "--model", "reference", "--data", "shapes", "--record", "0", "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out.strip().endswith("(hardware: cpu, bf16)")


def test_recipe_hardware_section_validates_in_one_line():
    from compression.runs.recipe import Recipe, RecipeError

    assert Recipe.from_yaml("hardware: {device: cuda:1, dtype: bf16}\n").hardware.device == "cuda:1"
    assert Recipe.from_yaml("model: reference\n").hardware.model_dump() == {"device": "auto", "dtype": "auto",
                                                                          "processes": 1, "parallelism": "auto",
                                                                          "kernels": "eager"}
    with pytest.raises(RecipeError, match=r"^recipe field hardware.kernels: got 'fast'"):
        Recipe.from_yaml("hardware: {kernels: fast}\n")
    with pytest.raises(RecipeError, match=r"^recipe field hardware.parallelism: got 'zero3'"):
        Recipe.from_yaml("hardware: {parallelism: zero3}\n")
    with pytest.raises(RecipeError, match=r"^recipe field hardware.device: got 'gpu'; expected auto, cpu, cuda"):
        Recipe.from_yaml("hardware: {device: gpu}\n")


def test_a_recipe_in_bf16_on_the_cpu_prunes_recovers_evaluates_and_exports(tmp_path):
    """prune -> recover (fp32 master weights under bf16 autocast) -> evaluate -> export, all in bf16; the
    export reloads with plain transformers in bf16 and answers as the run's model does."""
    import json

    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from compression.runs import export, pipeline
    from compression.runs.recipe import Recipe

    recipe = Recipe.from_dict({
        "model": "reference", "prune": {"method": "layer", "ratio": 0.2},
        "recovery": {"mode": "full", "distillation": "hidden", "max_steps": 3, "batch_size": 4},
        "data": {"calibration": {"source": "shapes", "samples": 4}, "train": {"source": "shapes", "samples": 12},
                 "eval": {"source": "shapes", "samples": 6}},
        "hardware": {"device": "cpu", "dtype": "bf16"}})
    metrics = pipeline.run_recipe(recipe, tmp_path / "run")
    assert metrics["hardware"]["device"] == "cpu" and metrics["hardware"]["dtype"] == "bf16"
    assert metrics["recovery"]["steps"] == 3 and metrics["recovery"]["final_loss"] == metrics["recovery"]["final_loss"]
    assert set(metrics["memory"]["peak_bytes"]) == {"load", "prune", "recover", "evaluate", "save"}
    assert all(v > 50e6 for v in metrics["memory"]["peak_bytes"].values())  # a real RSS, in bytes
    assert 0 <= metrics["compressed"]["accuracy"] <= 1 and metrics["original"]["accuracy"] > 0.5
    # bf16 weights: half the fp32 bytes of the same parameters
    assert abs(metrics["compressed"]["size_bytes"] - 2 * metrics["compressed"]["params_total"]) < 0.01 * \
        metrics["compressed"]["size_bytes"]
    with safe_open(str(tmp_path / "run" / "model" / "model.safetensors"), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
    log = (tmp_path / "run" / "logs" / "pipeline.log").read_text()
    assert "hardware: cpu, bf16" in log
    assert "vision tower shared by teacher and student (model.vision_tower)" in log  # both in bf16: one tower

    out = export.export_run(tmp_path / "run", tmp_path / "export", make_zip=False)  # its fresh-process check passes
    card = json.loads((out / "metrics.json").read_text())
    assert card["hardware"]["dtype"] == "bf16"
    again = AutoModelForImageTextToText.from_pretrained(out, dtype="auto")
    assert next(again.parameters()).dtype == torch.bfloat16
    assert type(again).__name__ == "LlavaForConditionalGeneration"  # plain transformers, no custom code
    assert again.config.text_config.num_hidden_layers == 8 - len(metrics["plan"]["layers_removed"]) < 8
