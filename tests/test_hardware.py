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
