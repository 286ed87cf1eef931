"""bitsandbytes int8 / nf4 of the language model, save / load, and simulated WxAy fake quantization."""
import json

import pytest
import torch

from compression.data import shapes as data
from compression.measure import evaluate
from compression import models
from compression.methods import quantize
from tests.tiny import encode, generate_answers, tiny_llava

QUESTIONS = ["how many red shapes are there ?", "what color is the circle ?", "is there a red square ?"]


@pytest.fixture(scope="module")
def batch():
    return [data.generate("test", i).image for i in range(len(QUESTIONS))], QUESTIONS


def _logits(model, processor, batch):
    with torch.no_grad():
        return model(**encode(processor, *batch)).logits


# ------------------------------------------------------------------------------------------ fake quantization

def test_fake_quantize_weight_matches_hand_computation():
    # 2 bits, min 0, max 4: scale 4/3, zero 0; w/scale = [0, 0.75, 1.65, 3] -> [0, 1, 2, 3]
    w = torch.tensor([[0.0, 1.0, 2.2, 4.0]])
    assert quantize.fake_quantize_weight(w, 2).tolist()[0] == pytest.approx([0.0, 4 / 3, 8 / 3, 4.0], abs=1e-6)
    # groups of 4 input channels: each group gets its own min-max, so both are exact here
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0, 20.0, 30.0, 40.0]])
    assert quantize.fake_quantize_weight(w, 2, group=4).tolist()[0] == pytest.approx(w[0].tolist(), abs=1e-5)
    assert not torch.allclose(quantize.fake_quantize_weight(w, 2, group=8), w, atol=1e-3)


def test_fake_quantize_activation_is_per_token():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 10.0, 20.0, 30.0]])
    assert torch.allclose(quantize.fake_quantize_activation(x, 2), x, atol=1e-5)
    assert not torch.allclose(quantize.fake_quantize_weight(x.reshape(1, 8), 2), x.reshape(1, 8), atol=1e-2)
    with pytest.raises(ValueError, match="a_bits 1 must be between 2 and 16"):
        quantize.fake_quantize_activation(x, 1)


def test_fake_quant_error_decreases_with_bits_and_is_reversible(batch):
    model, processor, anatomy = tiny_llava("llama", "clip")
    base = _logits(model, processor, batch)
    errors = {}
    for w_bits, a_bits in [(2, 2), (4, 4), (8, 8)]:
        with quantize.fake_quantize(model, anatomy, w_bits, a_bits) as handle:
            assert quantize.fake_quantized(model)
            errors[handle.label] = (_logits(model, processor, batch) - base).abs().mean().item()
    assert errors["W2A2"] > errors["W4A4"] > errors["W8A8"] > 0
    assert torch.equal(_logits(model, processor, batch), base)  # weights restored, hooks gone
    weight = torch.randn(64, 256)
    w_err = [(quantize.fake_quantize_weight(weight, b) - weight).norm().item() for b in (2, 3, 4, 8)]
    assert w_err == sorted(w_err, reverse=True)


# ------------------------------------------------------------------------------------------ bitsandbytes

@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_bnb_quantized_model_answers_and_round_trips(fmt, batch, tmp_path):
    import bitsandbytes as bnb

    reference, _, _ = tiny_llava("llama", "clip")
    model, processor, anatomy = tiny_llava("llama", "clip")
    base = _logits(reference, processor, batch)
    fp_bytes = models.tensor_bytes(model)
    quantize.quantize_model(model, anatomy, fmt)
    kind = bnb.nn.Linear8bitLt if fmt == "int8" else bnb.nn.Linear4bit
    linears = quantize.decoder_linears(model, anatomy)
    assert len(linears) == 3 * 7 and all(isinstance(m, kind) for _, _, m in linears.values())
    assert isinstance(model.model.multi_modal_projector.linear_1, torch.nn.Linear)  # projector stays fp
    assert quantize.quantization_format(model) == fmt
    assert models.tensor_bytes(model) < fp_bytes
    logits = _logits(model, processor, batch)
    # close to floating point: int8 within ~2 %, nf4 within ~30 % of the mean logit magnitude
    assert (logits - base).abs().mean() < (0.02 if fmt == "int8" else 0.3) * base.abs().mean()
    answers = generate_answers(model, processor, *batch)
    assert len(answers) == len(QUESTIONS) and all(isinstance(a, str) and a for a in answers)

    folder = quantize.save_quantized(model, processor, tmp_path / fmt, fmt)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes"
    assert config["load_in_8bit" if fmt == "int8" else "load_in_4bit"] is True
    assert json.loads((folder / "quantization.json").read_text())["format"] == fmt
    loaded = models.load(str(folder))
    quantize.prepare_bnb_for_cpu(loaded.model)  # tiny down_proj (in 96) does not fit the AVX512 NF4 kernel
    assert quantize.quantization_format(loaded.model) == fmt
    assert generate_answers(loaded.model, loaded.processor, *batch) == answers


def test_nf4_cpu_kernel_shape_check():
    assert quantize.nf4_cpu_kernel_fits(192, 512) and quantize.nf4_cpu_kernel_fits(512, 192)
    assert not quantize.nf4_cpu_kernel_fits(96, 64)  # in_features not a multiple of the block size 64
    assert not quantize.nf4_cpu_kernel_fits(64, 48)  # out_features not a multiple of 32


def test_quantize_rejects_bad_format_and_double_quantization():
    model, _, anatomy = tiny_llava("llama", "clip", layers=2)
    with pytest.raises(ValueError, match="quantization format 'int3' is unknown"):
        quantize.quantize_model(model, anatomy, "int3")
    quantize.quantize_model(model, anatomy, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize.quantize_model(model, anatomy, "nf4")
    with pytest.raises(ValueError, match="fake quantization needs the floating-point model"):
        quantize.fake_quantize(model, anatomy, 4, 4)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_a_bf16_model_quantizes_and_computes_in_bf16(fmt):
    """Quantization follows the model's precision (the user's bf16 model is not computed in fp32)."""
    from compression.data.sources import open_source, select

    loaded = models.load("reference", dtype="bf16")
    record = select(open_source("shapes", "eval"), samples=1).records[0]
    inputs = evaluate._to_model(evaluate.latency_inputs(loaded, record), loaded.model)
    with torch.no_grad():
        before = loaded.model(**inputs).logits.float()
    quantize.quantize_model(loaded.model, loaded.anatomy, fmt)
    assert quantize.quantization_format(loaded.model) == fmt
    config = loaded.model.config.quantization_config.to_dict()
    if fmt == "nf4":
        assert config["bnb_4bit_compute_dtype"] == "bfloat16"
    with torch.no_grad():
        after = loaded.model(**inputs).logits
    assert after.dtype == torch.bfloat16 and torch.isfinite(after).all()
    # the same answer token from the quantized model as from the bf16 one on this record
    assert torch.equal(after[0, -1].float().argmax(), before[0, -1].argmax())
