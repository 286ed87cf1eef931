"""Recovery training: answer-only labels, KD losses against hand-computed values, LoRA merge,
modes, deterministic resume, and two CPU processes (gloo) ending with identical weights."""
import copy
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from compression.methods import distributed, recover
from compression.models.prompting import prompt_format
from tests.tiny import shapes_records, tiny_llava

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava("llama", "clip", num_key_value_heads=2)


def test_labels_cover_the_answer_and_eos_only(tiny):
    model, processor, anatomy = tiny
    samples = shapes_records("train", 4)
    batch = recover.encode_for_training(prompt_format(processor), samples)
    tok = processor.tokenizer
    for i, s in enumerate(samples):
        labelled = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert labelled[-1] == tok.eos_token_id
        assert tok.decode(labelled[:-1]).strip() == s.answer
        # everything before the answer is the prompt, with exactly the model's number of image tokens
        n_image = (batch["input_ids"][i] == anatomy.image_token_index).sum().item()
        assert n_image == anatomy.visual_tokens
        assert batch["attention_mask"][i].sum().item() == len(labelled) + (batch["labels"][i] == -100).logical_and(
            batch["attention_mask"][i].bool()).sum().item()
    # the model accepts it and the loss is finite
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    assert math.isfinite(recover.answer_cross_entropy(out.logits, batch["labels"]).item())


def test_logits_kd_matches_hand_computation():
    s = torch.tensor([[[1.0, 2.0, 0.0], [0.5, 0.5, 0.5]]])
    t = torch.tensor([[[2.0, 0.0, 1.0], [3.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, False]])
    tau = 2.0
    ps = torch.softmax(s[0, 0] / tau, -1)
    pt = torch.softmax(t[0, 0] / tau, -1)
    by_hand = tau ** 2 * sum(pt[j] * (math.log(pt[j]) - math.log(ps[j])) for j in range(3))
    assert recover.logits_kd_loss(s, t, mask, tau).item() == pytest.approx(float(by_hand), rel=1e-5)
    # numbers: p_s = softmax([.5, 1, 0]) = (.3072, .5065, .1863), p_t = softmax([1, 0, .5]) = (.5065, .1863, .3072);
    # log ratios are (+.5, -1, +.5), so KL = .5 * .5065 - 1 * .1863 + .5 * .3072 = .22055; x tau^2 = .8822
    assert recover.logits_kd_loss(s, t, mask, tau).item() == pytest.approx(0.88206, abs=1e-4)
    # both positions: the mean of the two KLs
    both = recover.logits_kd_loss(s, t, torch.tensor([[True, True]]), 1.0).item()
    one = recover.logits_kd_loss(s, t, torch.tensor([[True, False]]), 1.0).item()
    two = recover.logits_kd_loss(s, t, torch.tensor([[False, True]]), 1.0).item()
    assert both == pytest.approx((one + two) / 2, rel=1e-6)
    assert recover.logits_kd_loss(t, t, mask, tau).item() == pytest.approx(0.0, abs=1e-7)


def test_hidden_kd_is_mse_over_attended_tokens_of_mapped_layers():
    student = (torch.zeros(1, 3, 2), torch.tensor([[[1.0, 1.0], [2.0, 0.0], [9.0, 9.0]]]))
    teacher = (torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), torch.tensor([[[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]]))
    mask = torch.tensor([[True, True, False]])  # the third token is padding: ignored
    # layer 2 of the teacher vs layer 1 of the student: diffs (1,0),(2,0) -> mean of squares = 5/4
    assert recover.hidden_kd_loss(student, teacher, {2: 1}, mask).item() == pytest.approx(1.25)
    # two pairs: mean of 1.25 and (layer 0 vs 0) 0
    assert recover.hidden_kd_loss(student, teacher, {2: 1, 0: 0}, mask).item() == pytest.approx(0.625)


def test_layer_mapping_pairs_kept_layers_and_the_last_state():
    assert recover.layer_mapping(8) == {8: 8}
    assert recover.layer_mapping(8, [2, 5]) == {8: 6}
    # kept teacher layers 0,1,3,4,6,7 -> student 0..5; the last (post-norm) state pairs with the last
    assert recover.layer_mapping(8, [2, 5], "kept") == {1: 1, 2: 2, 4: 3, 5: 4, 7: 5, 8: 6}
    assert recover.layer_mapping(8, [7], "kept") == {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 8: 7}
    with pytest.raises(ValueError, match="student layer 7 out of range"):
        recover.layer_mapping(8, [2, 5], {8: 7})


def test_modes_train_only_what_they_say(tiny):
    model, _, anatomy = tiny
    projector = {id(p) for p in model.get_submodule(anatomy.projector).parameters()}
    vision = {id(p) for p in model.get_submodule(anatomy.vision_tower).parameters()}
    m = recover.prepare_trainable(copy.deepcopy(model), anatomy, "projector")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("multi_modal_projector" in n for n in trainable)
    m = recover.prepare_trainable(copy.deepcopy(model), anatomy, "full")
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any("language_model.layers" in n for n in names) and "lm_head.weight" in names
    assert not any("vision_tower" in n for n in names)
    m = recover.prepare_trainable(copy.deepcopy(model), anatomy, "lora")
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    lora = {n for n in names if "lora_" in n}
    # A and B for q, k, v, o, gate, up, down in each of the 3 layers
    assert len(lora) == 2 * 7 * 3
    assert {n for n in names - lora} and all("multi_modal_projector" in n for n in names - lora)
    assert len(projector) > 0 and len(vision) > 0


def test_lora_merge_gives_the_same_outputs(tiny):
    model, processor, anatomy = tiny
    peft_model = recover.prepare_trainable(copy.deepcopy(model), anatomy, "lora", lora_r=4, lora_alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero; give the adapters something to merge
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = recover.encode_for_training(prompt_format(processor), shapes_records("train", 3))
    batch.pop("labels")
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(**batch).logits
        merged = recover.finish_model(peft_model)
        after = merged(**batch).logits
        plain = model(**batch).logits
    assert type(merged).__name__ == "LlavaForConditionalGeneration"
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (before - plain).abs().max() > 1e-3  # the adapters did change the model
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode, distillation, factor", [("projector", "none", 0.95), ("full", "hidden+logits", 0.7)])
def test_training_lowers_the_loss(tiny, mode, distillation, factor):
    model, processor, anatomy = tiny
    samples = shapes_records("train", 8)
    config = recover.RecoveryConfig(mode=mode, distillation=distillation, batch_size=8, epochs=12,
                                    learning_rate=1e-2, hidden_layers={3: 3}, warmup_ratio=0.0)
    result = recover.recover(copy.deepcopy(model), anatomy, prompt_format(processor), samples, config, teacher=model)
    assert result.steps == 12 and len(result.losses) == 12
    assert result.losses[-1] < factor * result.losses[0]


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tiny, tmp_path):
    model, processor, anatomy = tiny
    samples = shapes_records("train", 24)
    processor = prompt_format(processor)  # what recover prompts with

    def config(ckpt):
        return recover.RecoveryConfig(mode="lora", distillation="logits", batch_size=4, epochs=1,
                                      learning_rate=5e-3, checkpoint_every=2, checkpoint_dir=ckpt, seed=1)

    straight = recover.recover(copy.deepcopy(model), anatomy, processor, samples, config(None), teacher=model)

    class Killed(Exception):
        pass

    def kill_at_5(step, total, loss):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        recover.recover(copy.deepcopy(model), anatomy, processor, samples, config(tmp_path / "ckpt"),
                        teacher=model, progress=kill_at_5)
    assert recover.read_checkpoint_step(tmp_path / "ckpt") == 4
    resumed = recover.recover(copy.deepcopy(model), anatomy, processor, samples, config(tmp_path / "ckpt"),
                              teacher=model)
    assert resumed.resumed_from == 4 and resumed.steps == 6 and len(resumed.losses) == 2
    assert resumed.losses == pytest.approx(straight.losses[4:], rel=1e-5)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


_TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import copy, json, sys, torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from compression.methods import distributed, recover
    from compression.models.prompting import prompt_format
    from tests.tiny import shapes_records, tiny_llava
    out = sys.argv[1]
    model, processor, anatomy = tiny_llava(seed=0)
    accelerator = Accelerator(cpu=True)
    config = recover.RecoveryConfig(mode="full", distillation="logits", batch_size=8, epochs=1,
                                    learning_rate=1e-2, max_steps=3, seed=0)
    samples = shapes_records("train", 32)
    result = recover.recover(copy.deepcopy(model), anatomy, prompt_format(processor), samples, config, teacher=model,
                             accelerator=accelerator)
    rank = accelerator.process_index
    torch.save({{"state": result.model.state_dict(), "losses": result.losses,
                "world": accelerator.num_processes, "backend": str(accelerator.state.backend)}},
               f"{{out}}/rank{{rank}}.pt")
""")


def test_two_cpu_processes_gloo_end_with_identical_weights(tmp_path, tiny):
    script = tmp_path / "train_two.py"
    script.write_text(_TWO_PROCESS_SCRIPT.format(root=str(ROOT)))
    # `--multi_gpu` is accelerate's torchrun launcher; without CUDA the processes join with gloo on
    # CPU (`--cpu` would start a single process unless MPI is installed).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "29617", str(script), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and "gloo" in r0["backend"]
    assert r0["losses"] == r1["losses"] and len(r0["losses"]) == 3  # reduced across ranks
    model = tiny[0]
    changed = 0
    for name, w0 in r0["state"].items():
        assert torch.equal(w0, r1["state"][name]), name
        changed += not torch.equal(w0, model.state_dict()[name])
    assert changed > 10  # it trained
    # Same global batch in one process: DDP's averaged gradient is (up to per-shard token counts and
    # Adam's sign on near-zero gradients) the full batch's, so training follows nearly the same path.
    config = recover.RecoveryConfig(mode="full", distillation="logits", batch_size=8, epochs=1,
                                    learning_rate=1e-2, max_steps=3, seed=0)
    single = recover.recover(copy.deepcopy(model), tiny[2], prompt_format(tiny[1]), shapes_records("train", 32), config,
                             teacher=model)
    assert single.losses[:2] == pytest.approx(r0["losses"][:2], rel=1e-3)
    assert single.losses == pytest.approx(r0["losses"], rel=2e-2)
    initial = model.state_dict()
    moved = sum((w - initial[n]).abs().sum().item() for n, w in single.model.state_dict().items())
    apart = sum((w - r0["state"][n]).abs().sum().item() for n, w in single.model.state_dict().items())
    assert apart < 0.2 * moved


def _fsdp_plugin_from(config_file: Path, monkeypatch):
    """The FSDP plugin a process started by ``accelerate launch --config_file config_file`` builds."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(
        ["--config_file", str(config_file), "script.py"]))
    for name, value in prepare_multi_gpu_env(args).items():
        if name.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(name, value)
    return FullyShardedDataParallelPlugin()


@pytest.mark.parametrize("config", ["accelerate_fsdp.yaml", "accelerate_fsdp_cpu.yaml"])
@pytest.mark.parametrize("language,vision", [("llama", "clip"), ("qwen2", "siglip")])
def test_fsdp_configs_wrap_the_decoder_and_vision_layers_of_a_llava(config, language, vision, monkeypatch):
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    model = tiny_llava(language, vision)[0]
    plugin = _fsdp_plugin_from(ROOT / "configs" / config, monkeypatch)
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap is None
    # accelerate's default list (the model's _no_split_modules) names classes a LLaVA lacks
    with pytest.raises(ValueError, match="Could not find the transformer layer class"):
        fsdp2_prepare_auto_wrap_policy(plugin, model)
    distributed.restrict_wrap_to_present_classes(plugin, model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    units = [type(m).__name__ for m in model.modules() if policy(m)]
    decoder = {"llama": "LlamaDecoderLayer", "qwen2": "Qwen2DecoderLayer"}[language]
    tower = {"clip": "CLIP", "siglip": "Siglip"}[vision]
    # 3 decoder layers, 2 vision encoder layers, the vision embeddings
    assert sorted(units) == sorted([decoder] * 3 + [f"{tower}EncoderLayer"] * 2 + [f"{tower}VisionEmbeddings"])


_FSDP_SCRIPT = textwrap.dedent("""
    import copy, sys, torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads(1)
    from torch.distributed.tensor import DTensor
    from compression.methods import distributed, recover
    from compression.models.prompting import prompt_format, training_inputs
    from tests.tiny import shapes_records, tiny_llava
    out = sys.argv[1]
    model, processor, anatomy = tiny_llava(seed=0)
    prompt = prompt_format(processor)
    accelerator = distributed.launched_accelerator()  # what recover builds when given none
    batch = training_inputs(prompt, shapes_records("train", 2))
    batch.pop("labels")
    saved = {{"world": accelerator.num_processes, "backend": str(accelerator.state.backend)}}
    for mode in ("full", "lora"):
        config = recover.RecoveryConfig(mode=mode, distillation="logits", batch_size=8, epochs=1,
                                        learning_rate=1e-2, max_steps=3, seed=0)
        result = recover.recover(copy.deepcopy(model), anatomy, prompt, shapes_records("train", 32), config,
                                 teacher=model, accelerator=accelerator)
        prepared = accelerator._models[-1]  # the sharded model recover trained
        with torch.no_grad():
            logits = result.model(**batch).logits
        saved[mode] = {{"state": result.model.state_dict(), "losses": result.losses, "logits": logits,
                       "type": str(accelerator.distributed_type), "fsdp2": accelerator.is_fsdp2,
                       "all_dtensors": all(isinstance(p, DTensor) for p in prepared.parameters()),
                       "local": sum(p.to_local().numel() for p in prepared.parameters()),
                       "full": sum(p.numel() for p in prepared.parameters())}}
    torch.save(saved, f"{{out}}/rank{{accelerator.process_index}}.pt")
""")


def test_fsdp2_on_two_cpu_processes_matches_one_process(tmp_path, tiny):
    """FSDP2 (`fully_shard`) over gloo with configs/accelerate_fsdp_cpu.yaml: both ranks return the same
    full model, and it is the single-process one up to float32 summation order."""
    script = tmp_path / "train_fsdp.py"
    script.write_text(_FSDP_SCRIPT.format(root=str(ROOT)))
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(ROOT / "configs" / "accelerate_fsdp_cpu.yaml"),
               "--main_process_port", "29618", str(script), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=400,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and "gloo" in r0["backend"]
    model, processor, anatomy = tiny
    initial = model.state_dict()
    batch = recover.encode_for_training(prompt_format(processor), shapes_records("train", 2))
    batch.pop("labels")
    for mode in ("full", "lora"):
        a, b = r0[mode], r1[mode]
        # really sharded: FSDP2 parameters, each rank holding about half of them
        assert a["type"] == "DistributedType.FSDP" and a["fsdp2"] and a["all_dtensors"], mode
        assert a["local"] + b["local"] == a["full"] and a["local"] < 0.6 * a["full"], mode
        assert a["losses"] == b["losses"] and len(a["losses"]) == 3, mode
        assert set(a["state"]) == set(initial), mode  # a plain LLaVA again (LoRA merged)
        for name, w in a["state"].items():
            assert torch.equal(w, b["state"][name]), (mode, name)
        assert torch.equal(a["logits"], b["logits"]), mode
        config = recover.RecoveryConfig(mode=mode, distillation="logits", batch_size=8, epochs=1,
                                        learning_rate=1e-2, max_steps=3, seed=0)
        single = recover.recover(copy.deepcopy(model), anatomy, prompt_format(processor),
                                 shapes_records("train", 32), config, teacher=model)
        assert a["losses"] == pytest.approx(single.losses, rel=1e-5), mode
        # Tolerance: the gradients agree to ~1e-7 (float32 summation order in the all-reduce), and
        # Adam's m / sqrt(v) magnifies that on elements whose gradient is near zero; measured 1.5e-5
        # (full) and 1.7e-5 (lora) against weight changes up to 0.025 / 0.05. 1e-4 is under 1% of
        # what training moved; a real divergence is far larger (the learning-rate schedule stepped
        # once per process gave 1.25e-2).
        moved = 0
        for name, w in single.model.state_dict().items():
            torch.testing.assert_close(a["state"][name], w, atol=1e-4, rtol=0, msg=f"{mode} {name}")
            moved += not torch.equal(w, initial[name])
            if "vision_tower" in name:
                assert torch.equal(a["state"][name], initial[name]), (mode, name)  # frozen stays frozen
        assert moved > 10, mode  # it trained
        # The returned model runs (non-persistent buffers such as rotary inv_freq restored, not meta).
        with torch.no_grad():
            reference = single.model(**batch).logits
        torch.testing.assert_close(a["logits"], reference, atol=1e-3, rtol=0, msg=mode)
