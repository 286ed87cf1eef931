"""Background compression jobs: a SQLite store and one OS process per job.

A job is a validated recipe run by ``python -m compression worker JOB`` in its own process
(started detached, in its own session, so it outlives the page or shell that started it and
never runs inside the Streamlit process). The store, ``cache_dir()/jobs.db`` (SQLite, WAL, so
readers never block the worker), holds for each job its state (queued / running / succeeded /
failed / cancelled), stage, step / total, loss, ETA, pid and heartbeat. Per job,
``cache_dir()/jobs/<id>/`` holds the log and a work folder (the pruned model and recovery
checkpoints, for resuming). A finished job's run folder is ``cache_dir()/runs/<id>/``, written
by ``compression.runs.pipeline`` under a temporary name and renamed when complete.

A *sweep* (``compression.runs.sweep``) is a group of jobs queued together: the ``sweeps`` table
holds its name and spec, each of its jobs carries its id in the ``sweep`` column, and the group
is cancelled or resumed as one (``cancel_sweep``, ``resume_sweep``).

Scheduling is pull-based and has no daemon: ``schedule()`` marks dead workers failed (pid gone,
or no heartbeat for ``COMPRESSION_HEARTBEAT_STALE_S``) and starts queued jobs on free *slots*.
A slot is where one job runs (``slots()``): one per visible GPU, each worker pinned to its GPU with
``CUDA_VISIBLE_DEVICES``; on a machine without GPUs, ``$COMPRESSION_MAX_JOBS`` CPU slots (default 1),
each worker with the machine's cores divided between the slots (``OMP_NUM_THREADS``).
``$COMPRESSION_SLOTS`` names them explicitly (``cuda:0,cuda:2`` or ``cpu,cpu``). A worker knows its slot
from ``COMPRESSION_SLOT``; the job's row records it. It is called on submit, by a worker when it ends, and by every reader
(``list_jobs``, ``get``), so a UI that polls keeps the queue moving.

A recipe with ``hardware.processes: N`` holds N slots (``cuda:0,cuda:1``; first come, first served: a job
waiting for several slots is not overtaken by later ones). Its worker runs ``accelerate launch`` with N
processes (``compression.runs.launch``), each running ``worker JOB`` again as one rank; the worker keeps the
heartbeat and records the outcome, rank 0 reports progress. Cancel stops the whole process tree (torchrun puts
each rank in a session of its own); a rank whose worker was killed with -9 exits by itself.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Iterator

from compression.paths import REPO_ROOT, cache_dir
from compression.runs.recipe import Recipe

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")

_COLUMNS = """
    id TEXT PRIMARY KEY, name TEXT, recipe TEXT NOT NULL, state TEXT NOT NULL, stage TEXT,
    step INTEGER DEFAULT 0, total INTEGER DEFAULT 0, loss REAL, eta_s REAL, pid INTEGER,
    created REAL NOT NULL, started REAL, finished REAL, heartbeat REAL, error TEXT,
    run_dir TEXT, attempts INTEGER DEFAULT 0, sweep TEXT, slot TEXT
"""
_SWEEP_COLUMNS = "id TEXT PRIMARY KEY, name TEXT NOT NULL, spec TEXT NOT NULL, created REAL NOT NULL"
# Stores already checked for the columns added after their creation (one look per process and path).
_schema_checked: set[str] = set()
# Popen handles of workers this process started: polling them reaps zombies, and their return
# code tells how a worker died (a zombie still answers os.kill(pid, 0)).
_children: dict[str, subprocess.Popen] = {}


class JobError(ValueError):
    """A request the store cannot honour (unknown id, wrong state); one line."""


class JobCancelled(BaseException):
    """Raised in the worker by SIGTERM, so the pipeline unwinds and removes its temporary files."""


# ------------------------------------------------------------------------------------------- settings

def max_concurrent() -> int:
    """Jobs allowed to run at once: ``$COMPRESSION_MAX_JOBS``, default 1 (a CPU has no room for two)."""
    value = os.environ.get("COMPRESSION_MAX_JOBS", "1")
    if not value.isdigit() or int(value) < 1:
        raise JobError(f"COMPRESSION_MAX_JOBS={value!r}; expected a whole number >= 1")
    return int(value)


def slots() -> list[str]:
    """Where jobs run, one job per slot: ``cuda:N`` for each visible GPU, else ``cpu0 .. cpuK-1``
    (``$COMPRESSION_MAX_JOBS`` of them, default 1); ``$COMPRESSION_SLOTS`` (comma-separated ``cuda:N`` or
    ``cpu``) overrides both."""
    named = os.environ.get("COMPRESSION_SLOTS", "").strip()
    if named:
        out = []
        for i, part in enumerate(p.strip().lower() for p in named.split(",")):
            if part == "cpu":
                out.append(f"cpu{i}")
            elif part.startswith("cuda:") and part[5:].isdigit():
                out.append(part)
            else:
                raise JobError(f"COMPRESSION_SLOTS={named!r}: slot {part!r}; expected cuda:N or cpu, comma-separated")
        if len(set(out)) != len(out):
            raise JobError(f"COMPRESSION_SLOTS={named!r} names a GPU twice; expected each slot once")
        return out
    gpus = _gpu_count()
    if gpus:
        return [f"cuda:{i}" for i in range(gpus)]
    return [f"cpu{i}" for i in range(max_concurrent())]


def _gpu_count() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def slot_environment(slot: str, n_slots: int) -> dict[str, str]:
    """What a worker on ``slot`` gets: its one GPU (``CUDA_VISIBLE_DEVICES``), or no GPU and its share of
    the CPU cores; ``COMPRESSION_SLOT`` names the slot. A job of several processes holds several slots
    (``cuda:0,cuda:1``): all their GPUs, or one slot's share of the cores for each of its processes."""
    env = {"COMPRESSION_SLOT": slot}
    if slot.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(part.split(":", 1)[1] for part in slot.split(","))
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
        if n_slots > 1 or "OMP_NUM_THREADS" not in os.environ:
            share = max(1, (os.cpu_count() or 1) // n_slots)
            env["OMP_NUM_THREADS"] = str(min(share, int(os.environ.get("OMP_NUM_THREADS", share))))
    return env


def heartbeat_interval() -> float:
    return float(os.environ.get("COMPRESSION_HEARTBEAT_S", "2"))


def heartbeat_stale_after() -> float:
    return float(os.environ.get("COMPRESSION_HEARTBEAT_STALE_S", "120"))


def db_path() -> Path:
    return cache_dir() / "jobs.db"


def job_dir(job_id: str) -> Path:
    return cache_dir() / "jobs" / _checked_id(job_id)


def log_path(job_id: str) -> Path:
    return job_dir(job_id) / "log.txt"


def runs_dir() -> Path:
    return cache_dir() / "runs"


# ------------------------------------------------------------------------------------------- store

@contextmanager
def _db(immediate: bool = False) -> Iterator[sqlite3.Connection]:
    """A fresh connection per use (safe across threads and processes); ``immediate`` takes the
    write lock at once, so two schedulers never start the same queued job."""
    with closing(sqlite3.connect(db_path(), timeout=30, isolation_level=None)) as conn:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 30000")
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        _ensure_schema(conn)
        conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _ensure_schema(conn: sqlite3.Connection) -> None:
    conn.execute(f"CREATE TABLE IF NOT EXISTS jobs ({_COLUMNS})")
    conn.execute(f"CREATE TABLE IF NOT EXISTS sweeps ({_SWEEP_COLUMNS})")
    key = str(db_path())
    if key in _schema_checked:
        return
    present = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
    for column in ("sweep", "slot"):  # a store written before sweeps / slots existed
        if column not in present:
            try:
                conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} TEXT")
            except sqlite3.OperationalError as e:
                if "duplicate column" not in str(e):  # another process added it first
                    raise
    _schema_checked.add(key)


def _row(conn: sqlite3.Connection, job_id: str) -> dict[str, Any]:
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise JobError(f"no job {job_id!r}; see `python -m compression jobs list`")
    return dict(row)


def _checked_id(job_id: str) -> str:
    if not job_id or "/" in job_id or "\\" in job_id or job_id.startswith(".") or ".." in job_id:
        raise JobError(f"job id {job_id!r} is not a job id; expected a name like 'run-20261121-081500-ab12'")
    return job_id


def _new_id(name: str | None) -> str:
    return f"{name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


# ------------------------------------------------------------------------------------------- public API

def submit(recipe: Recipe | dict | str, name: str | None = None) -> str:
    """Queue a recipe (a Recipe, a dict, YAML text or a .yaml path); returns the job id."""
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_dict(recipe) if isinstance(recipe, dict) else Recipe.from_yaml(recipe)
    every = slots()
    if recipe.hardware.processes > len(every):
        raise JobError(f"hardware.processes {recipe.hardware.processes}: this machine has {len(every)} job slot(s) "
                       f"({', '.join(every)}); expected at most {len(every)} (a GPU each, or $COMPRESSION_MAX_JOBS "
                       "CPU slots)")
    job_id = _new_id(name or recipe.name)
    job_dir(job_id).mkdir(parents=True, exist_ok=True)
    with _db() as conn:
        conn.execute("INSERT INTO jobs (id, name, recipe, state, stage, created) VALUES (?, ?, ?, 'queued', "
                     "'queued', ?)", (job_id, name or recipe.name, recipe.to_yaml(), time.time()))
    schedule()
    return job_id


def list_jobs(sweep: str | None = None) -> list[dict[str, Any]]:
    """Every job (or every job of ``sweep``), newest first (the queue is advanced first)."""
    schedule()
    with _db() as conn:
        if sweep is None:
            rows = conn.execute("SELECT * FROM jobs ORDER BY created DESC, id DESC")
        else:
            rows = conn.execute("SELECT * FROM jobs WHERE sweep = ? ORDER BY created DESC, id DESC", (sweep,))
        return [_public(dict(r)) for r in rows]


def get(job_id: str) -> dict[str, Any]:
    schedule()
    with _db() as conn:
        return _public(_row(conn, _checked_id(job_id)))


def cancel(job_id: str) -> dict[str, Any]:
    """Cancel a queued job, or stop a running one (SIGTERM to its process group)."""
    with _db(immediate=True) as conn:
        job = _row(conn, _checked_id(job_id))
        if job["state"] in FINISHED:
            raise JobError(f"job {job_id} is already {job['state']}; only queued or running jobs can be cancelled")
        conn.execute("UPDATE jobs SET state = 'cancelled', finished = ?, error = 'cancelled by the user' "
                     "WHERE id = ?", (time.time(), job_id))
    if job["state"] == "running" and job["pid"]:
        try:
            os.killpg(job["pid"], signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        _wait_gone(job_id, job["pid"], timeout=10)
    schedule()
    return get(job_id)


def resume(job_id: str) -> dict[str, Any]:
    """Queue a failed or cancelled job again; it continues from its last checkpoint."""
    with _db(immediate=True) as conn:
        job = _row(conn, _checked_id(job_id))
        if job["state"] not in ("failed", "cancelled"):
            raise JobError(f"job {job_id} is {job['state']}; only failed or cancelled jobs can be resumed")
        conn.execute("UPDATE jobs SET state = 'queued', stage = 'queued', error = NULL, pid = NULL, finished = NULL,"
                     " eta_s = NULL WHERE id = ?", (job_id,))
    schedule()
    return get(job_id)


# ------------------------------------------------------------------------------------------- sweeps

def submit_sweep(name: str, spec: str, recipes: list[tuple[str, Recipe]]) -> str:
    """Queue ``recipes`` ``[(job name, recipe)]`` as one sweep, in that order; returns the sweep id.

    The sweep and all its jobs are written in one transaction: no half-queued sweep is ever seen.
    """
    if not recipes:
        raise JobError(f"sweep {name!r} has no runs; expected at least one recipe")
    sweep_id = _new_id(name)
    now = time.time()
    rows = []
    for i, (job_name, recipe) in enumerate(recipes):
        job_id = f"{job_name}-{sweep_id.removeprefix(name + '-')}"
        # created grows by a microsecond a job, so the scheduler starts them in the sweep's order
        rows.append((job_id, job_name, recipe.to_yaml(), now + i * 1e-6, sweep_id))
    for job_id, *_ in rows:
        job_dir(job_id).mkdir(parents=True, exist_ok=True)
    with _db(immediate=True) as conn:
        conn.execute("INSERT INTO sweeps (id, name, spec, created) VALUES (?, ?, ?, ?)", (sweep_id, name, spec, now))
        conn.executemany("INSERT INTO jobs (id, name, recipe, state, stage, created, sweep) VALUES "
                         "(?, ?, ?, 'queued', 'queued', ?, ?)", rows)
    schedule()
    return sweep_id


def list_sweeps() -> list[dict[str, Any]]:
    """Every sweep, newest first, with its job count per state (``counts``) and in all (``total``)."""
    schedule()
    with _db() as conn:
        sweeps = [dict(r) for r in conn.execute("SELECT * FROM sweeps ORDER BY created DESC, id DESC")]
        counts: dict[str, dict[str, int]] = {}
        for r in conn.execute("SELECT sweep, state, COUNT(*) FROM jobs WHERE sweep IS NOT NULL GROUP BY sweep, state"):
            counts.setdefault(r[0], {})[r[1]] = r[2]
    for s in sweeps:
        s["counts"] = {state: counts.get(s["id"], {}).get(state, 0) for state in STATES}
        s["total"] = sum(s["counts"].values())
        s["finished"] = sum(s["counts"][state] for state in FINISHED)
    return sweeps


def get_sweep(sweep_id: str) -> dict[str, Any]:
    for s in list_sweeps():
        if s["id"] == sweep_id:
            return s
    raise JobError(f"no sweep {sweep_id!r}; see `python -m compression sweep list`")


def cancel_sweep(sweep_id: str) -> list[dict[str, Any]]:
    """Cancel every queued job of the sweep, then stop its running ones; returns the sweep's jobs."""
    get_sweep(sweep_id)
    with _db(immediate=True) as conn:
        # Queued ones first, in one step: stopping a running job frees a slot, and the next
        # job of this same sweep must not take it.
        queued = conn.execute("UPDATE jobs SET state = 'cancelled', finished = ?, error = 'cancelled with its sweep' "
                              "WHERE sweep = ? AND state = 'queued'", (time.time(), sweep_id)).rowcount
        running = [r["id"] for r in conn.execute("SELECT id FROM jobs WHERE sweep = ? AND state = 'running'",
                                                 (sweep_id,))]
    if not queued and not running:
        raise JobError(f"sweep {sweep_id} has no queued or running jobs; nothing to cancel")
    for job_id in running:
        try:
            cancel(job_id)
        except JobError:
            pass  # it finished on its own meanwhile
    return list_jobs(sweep=sweep_id)


def resume_sweep(sweep_id: str) -> list[dict[str, Any]]:
    """Queue the sweep's failed and cancelled jobs again (each continues from its checkpoint)."""
    sweep = get_sweep(sweep_id)
    with _db(immediate=True) as conn:
        changed = conn.execute("UPDATE jobs SET state = 'queued', stage = 'queued', error = NULL, pid = NULL, "
                               "finished = NULL, eta_s = NULL WHERE sweep = ? AND state IN ('failed', 'cancelled')",
                               (sweep_id,)).rowcount
    if not changed:
        raise JobError(f"sweep {sweep_id} has nothing to resume ({sweep['counts']['succeeded']} of {sweep['total']} "
                       "succeeded, the rest queued or running)")
    schedule()
    return list_jobs(sweep=sweep_id)


def log_tail(job_id: str, n: int = 50) -> str:
    """The last ``n`` lines of the job's log."""
    path = log_path(job_id)
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 200 * max(1, n)))
        lines = f.read().decode("utf-8", "replace").splitlines()
    return "\n".join(lines[-n:])


def list_runs() -> list[dict[str, Any]]:
    """Finished run folders (complete ones only), newest first, each with its metrics and recipe."""
    root = runs_dir()
    runs = []
    for folder in sorted(root.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True) if root.is_dir() else []:
        if folder.name.startswith(".") or not (folder / "metrics.json").is_file():
            continue  # hidden names are runs still being written
        try:
            metrics = json.loads((folder / "metrics.json").read_text())
        except json.JSONDecodeError:
            continue
        runs.append({"name": folder.name, "path": str(folder), "model": str(folder / "model"),
                     "finished": (folder / "metrics.json").stat().st_mtime, "metrics": metrics,
                     "recipe": metrics.get("recipe")})
    return runs


def wait(job_id: str, timeout: float = 600, poll: float = 0.5) -> dict[str, Any]:
    """Block until the job has finished (for scripts and tests); returns its row."""
    deadline = time.time() + timeout
    while True:
        job = get(job_id)
        if job["state"] in FINISHED or time.time() > deadline:
            return job
        time.sleep(poll)


def _public(job: dict[str, Any]) -> dict[str, Any]:
    job["log_path"] = str(log_path(job["id"]))
    job["progress"] = job["step"] / job["total"] if job.get("total") else None
    return job


# ------------------------------------------------------------------------------------------- scheduler

def schedule() -> list[str]:
    """Mark dead workers failed, then start queued jobs while slots are free; returns the started ids."""
    now = time.time()
    # A read-only look first: a UI polling every second must not queue up behind the workers' writes.
    with _db() as conn:
        running = [dict(r) for r in conn.execute("SELECT * FROM jobs WHERE state = 'running'")]
        queued = conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()[0]
    dead = {(j["id"], j["pid"]): reason for j in running if (reason := _death_reason(j, now))}
    started: list[str] = []
    every = slots()
    if dead or (queued and len(running) < len(every)):
        with _db(immediate=True) as conn:
            for (job_id, pid), reason in dead.items():
                changed = conn.execute("UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE id = ? AND "
                                       "state = 'running' AND pid IS ?", (now, reason, job_id, pid)).rowcount
                if changed:
                    _append_log(job_id, f"[scheduler] marked failed: {reason}")
            held = [r["slot"] for r in conn.execute("SELECT slot FROM jobs WHERE state = 'running'")]
            busy = {part for slot in held if slot for part in slot.split(",")}
            free = [slot for slot in every if slot not in busy]
            # running jobs from before slots existed (no slot recorded) still take one each
            free = free[:max(0, len(free) - sum(1 for slot in held if not slot))]
            waiting = [(r["id"], r["recipe"]) for r in
                       conn.execute("SELECT id, recipe FROM jobs WHERE state = 'queued' ORDER BY created, id")]
            for job_id, text in waiting:
                need = _processes(text)
                if need > len(every):  # the machine changed since it was queued
                    conn.execute("UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE id = ?",
                                 (now, f"hardware.processes {need}: this machine has {len(every)} job slot(s); "
                                       f"expected at most {len(every)}", job_id))
                    continue
                if need > len(free):
                    break  # first come, first served: a job waiting for several slots is not overtaken
                slot, free = ",".join(free[:need]), free[need:]
                conn.execute("UPDATE jobs SET state = 'running', stage = 'starting', started = ?, heartbeat = ?, "
                             "pid = NULL, attempts = attempts + 1, slot = ? WHERE id = ?", (now, now, slot, job_id))
                process = _spawn(job_id, slot_environment(slot, len(every)))
                _children[job_id] = process
                conn.execute("UPDATE jobs SET pid = ? WHERE id = ?", (process.pid, job_id))
                started.append(job_id)
    for job_id, process in list(_children.items()):
        if process.poll() is not None and job_id not in started:
            _children.pop(job_id, None)
    return started


def _processes(recipe_text: str) -> int:
    """The processes a queued job's recipe asks for (1 when it cannot be read: the worker will say why)."""
    try:
        return Recipe.from_yaml(recipe_text).hardware.processes
    except ValueError:
        return 1


def _spawn(job_id: str, slot_env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(log_path(job_id), "ab")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1", **(slot_env or {}))
    try:
        # start_new_session: the worker leads its own process group, so cancel can signal all of it
        # and closing the terminal or the app does not kill it.
        return subprocess.Popen([sys.executable, "-m", "compression", "worker", job_id], cwd=REPO_ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        log.close()


def _death_reason(job: dict[str, Any], now: float) -> str | None:
    pid = job["pid"]
    beat = job["heartbeat"] or job["started"] or now
    if pid is None:
        return f"the worker never started ({now - beat:.0f}s)" if now - beat > heartbeat_stale_after() else None
    child = _children.get(job["id"])
    if child is not None and child.pid == pid and child.poll() is not None:
        code = child.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        return f"worker process {pid} {how} without reporting" + _last_error(job["id"])
    if not _alive(pid, job["id"]):
        return (f"worker process {pid} disappeared without reporting (killed, e.g. by SIGKILL or the "
                "out-of-memory killer)" + _last_error(job["id"]))
    if now - beat > heartbeat_stale_after():
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return f"no heartbeat from worker process {pid} for {now - beat:.0f}s (hung); killed it"
    return None


def _last_error(job_id: str) -> str:
    """``; last error in its log: <line>`` from the job's log (a traceback's final line), or nothing."""
    import re

    try:
        lines = log_path(job_id).read_text(errors="replace").splitlines()[-200:]
    except OSError:
        return ""
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*", line)]
    return f"; last error in its log: {errors[-1][:300]}" if errors else ""


def _alive(pid: int, job_id: str) -> bool:
    """Is ``pid`` still this job's worker? A zombie or a recycled pid does not count."""
    proc = Path(f"/proc/{pid}")
    if Path("/proc/self").exists():
        try:
            if job_id.encode() not in (proc / "cmdline").read_bytes():
                return False
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            return state not in ("Z", "X")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _wait_gone(job_id: str, pid: int, timeout: float) -> None:
    """Wait for the worker to exit after SIGTERM; SIGKILL it if it takes longer than ``timeout``."""
    def gone() -> bool:
        child = _children.get(job_id)
        return (child is not None and child.poll() is not None) or not _alive(pid, job_id)

    for signal_after in (signal.SIGKILL, None):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if gone():
                return
            time.sleep(0.05)
        if signal_after is not None:
            try:
                os.killpg(pid, signal_after)  # ignored SIGTERM for too long
            except (ProcessLookupError, PermissionError):
                return


def _append_log(job_id: str, line: str) -> None:
    try:
        with open(log_path(job_id), "a") as f:
            f.write(f"[{time.strftime('%H:%M:%S')}] {line}\n")
    except OSError:
        pass


# ------------------------------------------------------------------------------------------- worker

def run_worker(job_id: str) -> int:
    """The body of ``python -m compression worker JOB``: run the job's recipe, record how it went.

    A recipe of several processes (``hardware.processes``) is run by this worker under ``accelerate launch``
    (``compression.runs.launch``): each launched process runs ``worker JOB`` again (``_run_rank``); this one
    keeps the heartbeat, waits for the launch, and records how it went."""
    if os.environ.get(LAUNCHER_PID):
        return _run_rank(job_id)
    from transformers.utils import logging as hf_logging

    from compression.runs import pipeline

    hf_logging.disable_progress_bar()  # a log file is no place for progress bars
    pid = os.getpid()
    with _db(immediate=True) as conn:
        job = _row(conn, _checked_id(job_id))
        if job["state"] != "running" or job["pid"] not in (None, pid):
            print(f"job {job_id} is {job['state']} (pid {job['pid']}); this worker ({pid}) exits", flush=True)
            return 0
        conn.execute("UPDATE jobs SET pid = ?, heartbeat = ?, stage = 'load' WHERE id = ?", (pid, time.time(), job_id))

    def on_sigterm(signum, frame):
        raise JobCancelled()

    signal.signal(signal.SIGTERM, on_sigterm)
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(job_id, pid, stop), daemon=True).start()
    reporter = _Reporter(job_id, pid)
    work = job_dir(job_id) / "work"
    print(f"[worker {pid}] job {job_id}, attempt {job['attempts']}", flush=True)
    try:
        recipe = _slot_recipe(job["recipe"])
        print(f"[worker {pid}] slot {os.environ.get('COMPRESSION_SLOT', '') or 'none'}", flush=True)
        if recipe.hardware.processes > 1:
            _launch(job_id, recipe, pid)
        else:
            pipeline.run_recipe(recipe, runs_dir() / job_id, progress=reporter, work_dir=work,
                                log=lambda line: print(line, flush=True), overwrite=True,
                                extra_logs={"worker.log": log_path(job_id)})
    except JobCancelled:
        print(f"[worker {pid}] cancelled", flush=True)
        _finish(job_id, pid, "cancelled", "cancelled by the user")
        return 143
    except Exception as e:  # noqa: BLE001 - any failure is recorded on the job, with its first line
        import traceback

        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else "(no message)"
        # bad input (ValueError and kin) already reads as one line naming the value; anything else says its type
        reason = first if isinstance(e, ValueError) else f"{type(e).__name__}: {first}"
        _finish(job_id, pid, "failed", reason[:500])
        return 1
    finally:
        stop.set()
    _finish(job_id, pid, "succeeded", None, run_dir=str(runs_dir() / job_id))
    import shutil

    shutil.rmtree(work, ignore_errors=True)  # checkpoints are only for resuming an unfinished job
    print(f"[worker {pid}] done: {runs_dir() / job_id}", flush=True)
    return 0


LAUNCHER_PID = "COMPRESSION_LAUNCHER_PID"  # set for the processes a worker launched: the worker's pid


def _slot_recipe(text: str) -> Recipe:
    """The job's recipe computing where its slot is: its visible GPU(s) (``cuda``: under a launch, each
    process its own) or the CPU."""
    recipe = Recipe.from_yaml(text)
    slot = os.environ.get("COMPRESSION_SLOT", "")
    if slot.startswith("cuda:") and recipe.hardware.device.startswith("cuda"):
        recipe.hardware = recipe.hardware.model_copy(update={"device": "cuda"})
    elif slot.startswith("cpu"):
        recipe.hardware = recipe.hardware.model_copy(update={"device": "cpu"})
    return recipe


def _launch(job_id: str, recipe: Recipe, pid: int) -> None:
    """Run the job's processes under ``accelerate launch`` and wait for them; raises if the launch failed."""
    from compression import hardware
    from compression.runs import launch

    gpus = os.environ.get("COMPRESSION_SLOT", "").startswith("cuda:")
    chosen = hardware.resolve(recipe.hardware.device, recipe.hardware.dtype)  # one line if it is not there
    command = launch.launch_command(recipe, ["compression", "worker", job_id], gpus, chosen.mixed_precision)
    print(f"[worker {pid}] {recipe.hardware.processes} processes ({launch.parallelism(recipe)}): "
          + " ".join(command[1:]), flush=True)
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=dict(os.environ, **{LAUNCHER_PID: str(pid)}),
                               stdin=subprocess.DEVNULL)
    try:
        code = process.wait()
    except BaseException:  # cancelled (SIGTERM) or interrupted: no rank may outlive its job
        _stop_tree(process.pid)
        raise
    if code != 0:
        raise RuntimeError(f"accelerate launch exited with code {code}" + _last_error(job_id))


def _exit_with(job_id: str, pid: int, every_s: float = 1.0) -> None:
    """A launched rank's watchdog: exit at once when the worker that launched it is gone (killed with -9: its
    ranks, in sessions of their own, would otherwise finish a job already marked failed)."""
    while _alive(pid, job_id):
        time.sleep(every_s)
    print(f"[rank] the launching worker {pid} is gone; exiting", flush=True)
    os._exit(137)


def _stop_tree(pid: int, grace_s: float = 3.0) -> None:
    """SIGTERM ``pid`` and every process below it, SIGKILL what is left after ``grace_s``. torchrun starts each
    rank in a session of its own, so the job's process group does not reach them; and a rank stopped alone
    would leave the others waiting in a collective until gloo's timeout."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


def _run_rank(job_id: str) -> int:
    """One process of a launched job: the pipeline on this rank; rank 0 reports progress under the launching
    worker's pid, which alone heartbeats and finishes the job."""
    from transformers.utils import logging as hf_logging

    from compression.methods.distributed import launched_rank
    from compression.runs import pipeline

    hf_logging.disable_progress_bar()
    pid, rank = int(os.environ[LAUNCHER_PID]), launched_rank()

    def on_sigterm(signum, frame):
        raise JobCancelled()

    signal.signal(signal.SIGTERM, on_sigterm)
    with _db() as conn:
        job = _row(conn, _checked_id(job_id))
    if job["state"] != "running" or job["pid"] != pid:
        print(f"[rank {rank}] job {job_id} is {job['state']} (pid {job['pid']}); exiting", flush=True)
        return 0
    threading.Thread(target=_exit_with, args=(job_id, pid), daemon=True).start()
    reporter = _Reporter(job_id, pid) if rank == 0 else None
    log = (lambda line: print(line, flush=True)) if rank == 0 else (lambda line: print(f"[rank {rank}] {line}", flush=True))
    try:
        pipeline.run_recipe(_slot_recipe(job["recipe"]), runs_dir() / job_id, progress=reporter,
                            work_dir=job_dir(job_id) / "work", log=log, overwrite=True,
                            extra_logs={"worker.log": log_path(job_id)})
    except JobCancelled:
        return 143
    return 0


def _finish(job_id: str, pid: int, state: str, error: str | None, run_dir: str | None = None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with _db(immediate=True) as conn:
        # Only a job still running under this worker changes: a cancel that came first wins.
        conn.execute("UPDATE jobs SET state = ?, stage = ?, finished = ?, error = ?, run_dir = ?, eta_s = 0 "
                     "WHERE id = ? AND state = 'running' AND pid = ?",
                     (state, "done" if state == "succeeded" else state, time.time(), error, run_dir, job_id, pid))
    schedule()  # a slot is free: start the next queued job


def _heartbeat(job_id: str, pid: int, stop: threading.Event) -> None:
    while not stop.wait(heartbeat_interval()):
        try:
            with _db() as conn:
                conn.execute("UPDATE jobs SET heartbeat = ? WHERE id = ? AND pid = ?", (time.time(), job_id, pid))
        except sqlite3.Error:
            pass  # a busy store: the next beat will do


class _Reporter:
    """The pipeline's progress callback: stage, step / total, loss and ETA into the store, throttled."""

    def __init__(self, job_id: str, pid: int, every_s: float = 0.5):
        self.job_id, self.pid, self.every_s = job_id, pid, every_s
        self.last_write = 0.0
        self.last_stage = None
        self.first: tuple[float, int] | None = None  # (time, step) of this attempt's first recovery step

    def __call__(self, stage: str, step: int, total: int, loss: float | None) -> None:
        now = time.time()
        eta = None
        if stage == "recover" and total:
            if self.first is None:
                self.first = (now, step)
            t0, s0 = self.first
            if step > s0:
                eta = (now - t0) / (step - s0) * (total - step)
        if stage == self.last_stage and now - self.last_write < self.every_s and step != total:
            return
        self.last_stage, self.last_write = stage, now
        with _db() as conn:
            if not total:  # a stage without steps: keep the recovery's step / total / loss on view
                conn.execute("UPDATE jobs SET stage = ?, eta_s = NULL, heartbeat = ? WHERE id = ? AND pid = ?",
                             (stage, now, self.job_id, self.pid))
                return
            conn.execute("UPDATE jobs SET stage = ?, step = ?, total = ?, loss = COALESCE(?, loss), eta_s = ?, "
                         "heartbeat = ? WHERE id = ? AND pid = ?",
                         (stage, step, total, loss, eta, now, self.job_id, self.pid))
