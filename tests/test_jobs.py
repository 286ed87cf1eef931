"""Background jobs: real worker processes on a tiny model. kill -9 detected, resume from the
checkpoint, cancel, a store that survives a restart, two queued jobs with concurrency 1, the run
folder written atomically, and the same metrics from the CLI and from a job."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from compression.cli import main as cli
from compression.runs import jobs
from compression.runs import pipeline
from compression.runs.recipe import Recipe
from tests.tiny import save_tiny

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


# every test: one thread per worker, fast heartbeats, one job at a time, no worker left behind
pytestmark = pytest.mark.usefixtures("quiet_workers")


def recipe_for(folder: Path, steps: int, name: str = "tiny", checkpoint_every: int = 5) -> Recipe:
    return Recipe.from_dict({
        "name": name, "model": str(folder),
        "prune": {"method": "layer", "ratio": 0.3},
        "recovery": {"mode": "lora", "distillation": "logits", "batch_size": 4,
                     "epochs": 3, "max_steps": steps, "learning_rate": 5e-3, "checkpoint_every": checkpoint_every},
        # a job meant to be stopped while it runs gets enough data to outlast the test (steps >= 1000: ~300 steps)
        "data": {"train": {"source": "shapes", "fraction": 0.05 if steps >= 1000 else 0.005},
                 "eval": {"source": "shapes", "samples": 8}}})


def wait_for(predicate, timeout=600, poll=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError("timed out")


def comparable(metrics: dict) -> dict:
    """What must not depend on the process that ran the recipe (latency does)."""
    return {"original": {k: metrics["original"][k] for k in ("accuracy", "per_type", "params_total")},
            "compressed": {k: metrics["compressed"][k] for k in ("accuracy", "per_type", "params_total")},
            "plan": metrics["plan"], "steps": metrics["recovery"]["steps"],
            "final_loss": round(metrics["recovery"]["final_loss"], 5)}


def test_kill_9_is_detected_and_resume_continues_from_the_checkpoint(tiny_folder, tmp_path):
    recipe = recipe_for(tiny_folder, steps=60)
    straight = pipeline.run_recipe(recipe, tmp_path / "straight")
    job_id = jobs.submit(recipe)
    job = wait_for(lambda: (j := jobs.get(job_id))["step"] >= 8 and j)
    assert job["state"] == "running" and job["stage"] == "recover" and job["total"] == 60
    assert job["loss"] is not None and job["eta_s"] is not None and job["eta_s"] > 0
    os.killpg(job["pid"], signal.SIGKILL)
    failed = wait_for(lambda: (j := jobs.get(job_id))["state"] == "failed" and j, timeout=30)
    assert "SIGKILL" in failed["error"]
    assert not (jobs.runs_dir() / job_id).exists()

    assert jobs.resume(job_id)["state"] in ("queued", "running")
    done = jobs.wait(job_id, timeout=600)
    assert done["state"] == "succeeded", jobs.log_tail(job_id, 30)
    assert done["attempts"] == 2 and done["step"] == done["total"] == 60
    metrics = json.loads((Path(done["run_dir"]) / "metrics.json").read_text())
    assert metrics["recovery"]["resumed_from"] >= 5 and metrics["recovery"]["resumed_from"] % 5 == 0
    assert "resumed from the checkpoint at step" in jobs.log_tail(job_id, 200)
    # the resumed run lands where the uninterrupted one did
    assert comparable(metrics) == comparable(straight)


def test_cancel_and_a_store_that_survives_a_restart(tiny_folder):
    running = jobs.submit(recipe_for(tiny_folder, steps=5000, name="long"))
    queued = jobs.submit(recipe_for(tiny_folder, steps=3, name="waiting"))
    assert jobs.get(queued)["state"] == "queued"  # concurrency 1: it waits
    wait_for(lambda: jobs.get(running)["step"] >= 1)
    assert jobs.cancel(queued)["state"] == "cancelled"

    # Another process (a restarted app) opens the store and sees every job as it is.
    mine = {j["id"]: (j["state"], j["name"], j["created"], j["attempts"]) for j in jobs.list_jobs()}
    code = ("import json; from compression.runs import jobs; "
            "print(json.dumps([[j['id'], j['state'], j['name'], j['created'], j['attempts']] for j in jobs.list_jobs()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    theirs = {row[0]: tuple(row[1:]) for row in json.loads(out.stdout)}
    assert theirs == mine and mine[running][0] == "running" and mine[queued][0] == "cancelled"

    pid = jobs.get(running)["pid"]
    cancelled = jobs.cancel(running)
    assert cancelled["state"] == "cancelled" and cancelled["error"] == "cancelled by the user"
    assert not jobs._alive(pid, running)
    assert jobs.get(running)["state"] == "cancelled"  # the worker's own exit does not overwrite it
    assert "cancelled" in jobs.log_tail(running, 5)
    assert list(jobs.runs_dir().glob("*")) == [] if jobs.runs_dir().exists() else True  # no half-written run
    with pytest.raises(jobs.JobError, match="already cancelled"):
        jobs.cancel(running)


def test_two_queued_jobs_run_one_after_the_other_and_match_the_cli(tiny_folder, tmp_path, capsys):
    recipe = recipe_for(tiny_folder, steps=6, name="pair")
    first, second = jobs.submit(recipe), jobs.submit(recipe)
    most_running = 0
    while True:
        rows = {j["id"]: j for j in jobs.list_jobs()}
        most_running = max(most_running, sum(j["state"] == "running" for j in rows.values()))
        if all(rows[i]["state"] in jobs.FINISHED for i in (first, second)):
            break
        time.sleep(0.1)
    a, b = rows[first], rows[second]
    assert a["state"] == b["state"] == "succeeded", jobs.log_tail(second, 30)
    assert most_running == 1
    assert b["started"] >= a["finished"] - 0.5  # the second started when the first ended

    path = tmp_path / "pair.yaml"
    path.write_text(recipe.to_yaml())
    assert cli.main(["run", str(path), "--out", str(tmp_path / "cli-run"), "--json"]) == 0
    from_cli = json.loads(capsys.readouterr().out)["metrics"]
    from_job = json.loads((Path(a["run_dir"]) / "metrics.json").read_text())
    assert comparable(from_cli) == comparable(from_job) == comparable(
        json.loads((Path(b["run_dir"]) / "metrics.json").read_text()))
    runs = {r["name"]: r for r in jobs.list_runs()}
    assert {first, second} <= set(runs)
    assert (Path(runs[first]["path"]) / "model" / "model.safetensors").is_file()
    assert yaml.safe_load((Path(runs[first]["path"]) / "recipe.yaml").read_text())["name"] == "pair"
    assert {"pipeline.log", "worker.log"} <= {p.name for p in (Path(runs[first]["path"]) / "logs").iterdir()}


def _insert_running(job_id: str, pid: int, heartbeat: float) -> None:
    jobs.job_dir(job_id).mkdir(parents=True, exist_ok=True)
    with jobs._db() as conn:
        conn.execute("INSERT INTO jobs (id, recipe, state, created, started, heartbeat, pid) "
                     "VALUES (?, 'model: reference', 'running', ?, ?, ?, ?)",
                     (job_id, time.time(), time.time(), heartbeat, pid))


def test_a_worker_gone_or_hung_is_marked_failed_with_the_reason():
    gone = subprocess.Popen(["true"])
    gone.wait()
    _insert_running("gone-1", gone.pid, time.time())
    hung = subprocess.Popen(["sh", "-c", "sleep 30", "hung-1"], start_new_session=True)
    _insert_running("hung-1", hung.pid, time.time() - 3600)
    jobs.schedule()
    assert "disappeared" in jobs.get("gone-1")["error"] and jobs.get("gone-1")["state"] == "failed"
    job = jobs.get("hung-1")
    assert job["state"] == "failed" and "no heartbeat" in job["error"]
    assert hung.wait(timeout=5) == -signal.SIGKILL


def test_the_run_folder_appears_only_when_complete(tiny_folder, tmp_path, monkeypatch):
    recipe = recipe_for(tiny_folder, steps=2)

    def broken_save(student, folder, plan):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(pipeline, "_save_model", broken_save)
    with pytest.raises(OSError, match="disk full"):
        pipeline.run_recipe(recipe, jobs.runs_dir() / "half")
    assert not (jobs.runs_dir() / "half").exists()
    assert [p.name for p in jobs.runs_dir().iterdir()] == []  # the temporary folder is gone too
    (jobs.runs_dir() / ".half.tmp-1").mkdir()
    (jobs.runs_dir() / ".half.tmp-1" / "metrics.json").write_text("{}")
    assert jobs.list_runs() == []


def test_bad_requests_are_one_line_errors():
    with pytest.raises(jobs.JobError, match="no job 'nope'"):
        jobs.get("nope")
    with pytest.raises(jobs.JobError, match="not a job id"):
        jobs.get("../etc")
    with pytest.raises(ValueError, match="recovery.mode"):
        jobs.submit({"recovery": {"mode": "everything"}})


def test_a_failed_job_says_why_in_one_line(tiny_folder, tmp_path):
    data = tmp_path / "test.json"
    from tests.tiny import write_llava_dataset

    write_llava_dataset(tmp_path, n=3, multi_turn=False, name="test.json")
    records = json.loads(data.read_text())
    records[1]["image"] = "images/gone.png"  # a bad record: found when the job reads its data
    data.write_text(json.dumps(records))
    recipe = Recipe.from_dict({"name": "bad-data", "model": str(tiny_folder),
                               "data": {"eval": {"source": str(data), "samples": 3}}})
    job_id = jobs.submit(recipe)
    done = jobs.wait(job_id, timeout=300)
    assert done["state"] == "failed"
    assert done["error"] == ("record 1 of test.json: image images/gone.png not found under "
                             f"{tmp_path} (set image_root to the images' folder)")
    assert "Traceback" in jobs.log_tail(job_id, 50)  # the traceback stays in the log


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_two_jobs_run_at_once_on_two_cpu_slots_one_killed_one_cancelled_each_alone(tiny_folder, monkeypatch):
    monkeypatch.setenv("COMPRESSION_MAX_JOBS", "2")
    monkeypatch.delenv("OMP_NUM_THREADS")  # each slot gets its share of the cores
    assert jobs.slots() == ["cpu0", "cpu1"]
    long = jobs.submit(recipe_for(tiny_folder, steps=5000, name="long"))
    short = jobs.submit(recipe_for(tiny_folder, steps=40, name="short"))
    # both running at once (both in recovery), each on its own slot, told so in its environment
    both = wait_for(lambda: (a := jobs.get(long))["step"] >= 1 and (b := jobs.get(short))["step"] >= 8
                    and b["state"] == "running" and (a, b))
    assert {both[0]["slot"], both[1]["slot"]} == {"cpu0", "cpu1"}
    for job in both:
        env = _environ(job["pid"])
        assert env["COMPRESSION_SLOT"] == job["slot"] and env["CUDA_VISIBLE_DEVICES"] == ""
        assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    long_pid, short_pid = both[0]["pid"], both[1]["pid"]

    # kill -9 of one worker: detected for that job alone; the other keeps running
    os.killpg(short_pid, signal.SIGKILL)
    failed = wait_for(lambda: (j := jobs.get(short))["state"] == "failed" and j, timeout=30)
    assert "SIGKILL" in failed["error"]
    assert jobs.get(long)["state"] == "running" and jobs._alive(long_pid, long)
    step = jobs.get(long)["step"]
    wait_for(lambda: jobs.get(long)["step"] > step, timeout=60)  # still making progress

    # cancel of the other: it alone stops; the killed one resumes from its checkpoint on a free slot
    assert jobs.cancel(long)["state"] == "cancelled"
    assert jobs.resume(short)["state"] in ("queued", "running")
    done = jobs.wait(short, timeout=600)
    assert done["state"] == "succeeded" and done["slot"] in ("cpu0", "cpu1") and done["attempts"] == 2
    assert f"slot {done['slot']}" in jobs.log_tail(short, 200)
    metrics = json.loads((Path(done["run_dir"]) / "metrics.json").read_text())
    assert metrics["recovery"]["resumed_from"] >= 5
    assert jobs.get(long)["state"] == "cancelled" and not (jobs.runs_dir() / long).exists()


def test_slots_follow_the_gpus_and_can_be_named(monkeypatch):
    monkeypatch.setattr(jobs, "_gpu_count", lambda: 2)
    assert jobs.slots() == ["cuda:0", "cuda:1"]
    assert jobs.slot_environment("cuda:1", 2) == {"COMPRESSION_SLOT": "cuda:1", "CUDA_VISIBLE_DEVICES": "1"}
    monkeypatch.setenv("COMPRESSION_SLOTS", "cuda:0,cuda:3")
    assert jobs.slots() == ["cuda:0", "cuda:3"]
    monkeypatch.setenv("COMPRESSION_SLOTS", "cuda:0,gpu1")
    with pytest.raises(jobs.JobError, match=r"slot 'gpu1'; expected cuda:N or cpu"):
        jobs.slots()


def test_a_recipe_of_two_processes_takes_two_slots_and_splits_its_evaluation(tiny_folder, monkeypatch):
    """hardware.processes 2: the worker runs the recipe under `accelerate launch` (DDP over gloo on two CPU
    slots); recovery trains on both, each process answers half the evaluation records, rank 0 gathers them."""
    from compression import models
    from compression.measure import evaluate

    monkeypatch.setenv("COMPRESSION_MAX_JOBS", "2")
    recipe = recipe_for(tiny_folder, steps=4, name="two")
    recipe.hardware = recipe.hardware.model_copy(update={"processes": 2})
    with pytest.raises(jobs.JobError, match=r"hardware.processes 3: this machine has 2 job slot\(s\)"):
        jobs.submit(recipe.model_copy(update={"hardware": recipe.hardware.model_copy(update={"processes": 3})}))
    job_id = jobs.submit(recipe)
    done = jobs.wait(job_id, timeout=600)
    log = jobs.log_tail(job_id, 400)
    assert done["state"] == "succeeded", log[-3000:]
    assert done["slot"] == "cpu0,cpu1"
    assert "2 processes (ddp)" in log and "evaluation split over 2 processes (up to 4 records each)" in log
    assert "recovery on 2 process(es)" in log and "[rank 1]" in log
    metrics = json.loads((Path(done["run_dir"]) / "metrics.json").read_text())
    assert metrics["recovery"]["steps"] == 4 and metrics["eval_samples"] == 8
    # the gathered answers are each record's own: one process scoring the same records agrees
    test = pipeline.data_selections(recipe, recipe.recovery.seed)["eval"]
    original = evaluate.accuracy(models.load(str(tiny_folder)), test.records)
    assert metrics["original"]["accuracy"] == original.accuracy and metrics["original"]["per_type"] == original.per_type
    compressed = evaluate.accuracy(models.load(str(Path(done["run_dir"]) / "model")), test.records)
    assert metrics["compressed"]["accuracy"] == compressed.accuracy
    assert metrics["compressed"]["per_type"] == compressed.per_type


def test_launch_command_follows_the_recipe():
    from compression.runs import launch

    lora = Recipe.from_dict({"recovery": {"mode": "lora"}, "hardware": {"processes": 4}})
    full = Recipe.from_dict({"recovery": {"mode": "full"}, "hardware": {"processes": 2}})
    assert launch.parallelism(lora) == "ddp" and launch.parallelism(full) == "fsdp"
    command = launch.launch_command(lora, ["compression", "worker", "j1"], gpus=True, mixed_precision="bf16", port=29999)
    assert command[command.index("--num_processes") + 1] == "4" and "--multi_gpu" in command
    assert command[command.index("--mixed_precision") + 1] == "bf16" and command[-4:] == ["-m", "compression",
                                                                                          "worker", "j1"]
    assert command[command.index("--main_process_port") + 1] == "29999"
    gpu, cpu = (launch.launch_command(full, ["compression", "worker", "j2"], gpus=g) for g in (True, False))
    assert gpu[gpu.index("--config_file") + 1].endswith("configs/accelerate_fsdp.yaml")
    assert cpu[cpu.index("--config_file") + 1].endswith("configs/accelerate_fsdp_cpu.yaml")
    assert Path(cpu[cpu.index("--config_file") + 1]).is_file()
    with pytest.raises(ValueError, match="at least 2 processes"):
        launch.launch_command(Recipe(), ["compression"], gpus=False)
    with pytest.raises(ValueError, match="processes"):
        Recipe.from_dict({"hardware": {"processes": 0}})


def _processes_of(job_id: str) -> list[int]:
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if job_id.encode() in (proc / "cmdline").read_bytes() and \
                    (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                out.append(int(proc.name))
        except OSError:
            pass
    return out


def test_cancelling_a_launched_job_stops_every_process(tiny_folder, monkeypatch):
    monkeypatch.setenv("COMPRESSION_MAX_JOBS", "2")
    recipe = recipe_for(tiny_folder, steps=5000, name="twolong")
    recipe.hardware = recipe.hardware.model_copy(update={"processes": 2})
    job_id = jobs.submit(recipe)
    wait_for(lambda: len(_processes_of(job_id)) >= 4)  # the worker, the launcher, two ranks
    assert jobs.get(job_id)["slot"] == "cpu0,cpu1"
    assert jobs.cancel(job_id)["state"] == "cancelled"
    wait_for(lambda: not _processes_of(job_id), timeout=60)
    assert jobs.get(job_id)["state"] == "cancelled" and not (jobs.runs_dir() / job_id).exists()
    # the two slots are free again: a one-process job starts at once
    short = jobs.submit(recipe_for(tiny_folder, steps=2, name="after"))
    assert jobs.wait(short, timeout=600)["state"] == "succeeded"
