"""Ray: shard a diagnosis over the GPUs (or CPUs) of a cluster.

:func:`diagnose_ray` runs the same computation as :func:`opdlens.diagnose.run.diagnose`, split in
jobs that a pool of Ray actors takes from a queue (dynamic load balancing):

* a *phase-1 job* per question: initial rollouts, representative paths, solutions, targeted
  enrichment; its summary row and skips are written to ``phase1/<question>.parquet``, which
  marks the question's tree as complete;
* a *phase-2 job* per (question, teacher): the teacher's scoring of every path of the question
  and the per-node signals, written to ``nodes/<teacher>/<question>.parquet``. Phase-2 jobs of a
  question are queued as soon as its phase-1 job finishes (before any further phase-1 job), or
  at start when its tree is already stored.

Each actor loads the models once (one model replica per GPU actor, ``num_gpus=1``) and writes
into the run directory itself, so **the run directory must be on a filesystem that every node
sees at the same path** (NFS, Lustre, a mounted bucket...); on one machine any directory works.

Every write goes through :class:`opdlens.diagnose.store.RunStore`: chunks and tables appear atomically
and their seeds derive from names only, so a job that runs twice (an actor killed and its job
retried, or a whole run interrupted and started again) writes the same files with the same
contents and nothing is counted twice. The final tables equal those of an uninterrupted
single-process run with the same seed.

Fault tolerance: actors restart after a crash (``max_restarts``) and Ray retries the calls that
were in flight on them (``max_task_retries``); an actor that stays dead is dropped and its job
is given to another one. An error of the job itself (e.g. a question without any usable
rollout) stops the run with the question named; everything finished stays on disk.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pandas as pd
from tqdm.auto import tqdm

from opdlens.diagnose.diagnosis import Diagnosis, write_run_tables
from opdlens.diagnose.questions import QuestionEnv, skip_row
from opdlens.diagnose.run import check_questions, write_config
from opdlens.diagnose.store import RunStore
from opdlens.errors import OpdlensError

#: Folder of the per-question phase-1 records (summary row and skips, as JSON).
PHASE1_DIR = "phase1"


class WorkerFactory(Protocol):
    """Builds what one actor needs; must be picklable (it is shipped to every actor)."""

    def question_ids(self) -> list[str]:
        """The run's question ids, in order (called on the driver: must not load models)."""
        ...

    def __call__(self, out_dir: str) -> tuple[Diagnosis, Sequence[QuestionEnv]]:
        """The :class:`Diagnosis` writing into ``out_dir`` and the question environments
        (called once per actor: loads the models)."""
        ...


@dataclass
class ConfigFactory:
    """The :class:`WorkerFactory` of a :class:`opdlens.diagnose.config.DiagnoseConfig`: the models are
    loaded as :func:`opdlens.diagnose.run.diagnose` does, on the actor's own GPU when the config asks
    for CUDA (Ray makes exactly that GPU visible, so any ``cuda:<i>`` becomes ``cuda``)."""

    config: Any

    def question_ids(self) -> list[str]:
        from opdlens.tasks import get_task

        cfg = self.config
        task = get_task(cfg.task, **cfg.task_args)
        return [q.id for q in task.load(split=cfg.split, n=cfg.n_questions, seed=cfg.seed)]

    def inputs(self) -> pd.DataFrame:
        """``inputs.parquet`` of the run (question id, prompt text, gold answer), as
        :func:`opdlens.diagnose.run.diagnose` writes it (called on the driver: no models)."""
        from opdlens.tasks import get_task

        cfg = self.config
        qs = get_task(cfg.task, **cfg.task_args).load(split=cfg.split, n=cfg.n_questions, seed=cfg.seed)
        return pd.DataFrame(
            {
                "question_id": [q.id for q in qs],
                "question_text": [q.prompt for q in qs],
                "gold": [str(q.answer) for q in qs],
            }
        )

    def __call__(self, out_dir: str) -> tuple[Diagnosis, Sequence[QuestionEnv]]:
        from opdlens.diagnose.run import build_diagnosis

        update: dict[str, Any] = {"out_dir": out_dir}
        if str(self.config.device).startswith("cuda"):
            update["device"] = "cuda"
        return build_diagnosis(self.config.model_copy(update=update), progress=False)


class DiagnosisWorker:
    """The actor: builds its models once, then runs phase-1 and phase-2 jobs on request.

    A failure to build (unknown model, incompatible tokenizers...) is kept and reported by
    :meth:`ready` so the driver can show the message instead of an actor-death trace.
    """

    def __init__(self, factory: WorkerFactory, out_dir: str) -> None:
        self.error: str | None = None
        self.envs: dict[str, QuestionEnv] = {}
        try:
            self.diag, envs = factory(out_dir)
            self.envs = {e.id: e for e in envs}
        except OpdlensError as exc:
            self.error = str(exc)

    def ready(self) -> str | None:
        """None when the models are loaded, else the error message."""
        return self.error

    def _env(self, qid: str) -> QuestionEnv:
        if self.error is not None:
            raise OpdlensError(self.error)
        if qid not in self.envs:
            raise OpdlensError(f"question {qid!r} is not among this worker's questions")
        return self.envs[qid]

    def phase1(self, qid: str) -> dict[str, Any]:
        """Phase 1 of a question, or its context-length skip; writes and returns its record."""
        env = self._env(qid)
        reason = self.diag.too_long(env)
        record: dict[str, Any]
        if reason is not None:
            record = {"summary": None, "skips": [skip_row(qid, "", reason)], "teachers": []}
        else:
            prep, summary = self.diag.phase1(env)
            record = {
                "summary": {k: (v.item() if hasattr(v, "item") else v) for k, v in summary.items()},
                "skips": prep.skips,
                "teachers": [t.spec.name for t in self.diag.teachers if t.spec.name in prep.contexts],
            }
        write_phase1_record(self.diag.store, qid, record)
        return record

    def phase2(self, qid: str, teacher: str) -> str:
        """Score one teacher on one question whose phase 1 is done; returns the teacher's name."""
        env = self._env(qid)
        self.diag.phase2(env, self.diag.prepare(env), {teacher})
        return teacher


def phase1_file(store: RunStore, qid: str) -> str:
    """Relative path of a question's phase-1 record."""
    return store.question_file(PHASE1_DIR, qid)


def write_phase1_record(store: RunStore, qid: str, record: dict[str, Any]) -> None:
    """Atomically store a question's phase-1 record (it marks the tree as complete)."""
    store.write_table(phase1_file(store, qid), pd.DataFrame({"question_id": [qid], "record": [json.dumps(record)]}))


def read_phase1_record(store: RunStore, qid: str) -> dict[str, Any] | None:
    """A question's phase-1 record, or None when its phase 1 has not finished."""
    if not store.has(phase1_file(store, qid)):
        return None
    return dict(json.loads(store.read_table(phase1_file(store, qid))["record"].iloc[0]))


@dataclass(frozen=True)
class _Job:
    qid: str
    teacher: str | None = None  # None: phase 1

    def __str__(self) -> str:
        return (
            f"phase 1 of question {self.qid!r}"
            if self.teacher is None
            else (f"scoring of question {self.qid!r} by teacher {self.teacher!r}")
        )


def diagnose_ray(
    config: Any,
    address: str | None = None,
    *,
    num_workers: int | None = None,
    policy_factory: WorkerFactory | None = None,
    progress: bool = True,
    max_restarts: int = 2,
    max_job_attempts: int = 3,
    on_result: Callable[[int, list[Any]], None] | None = None,
) -> RunStore:
    """Run a diagnosis on a Ray cluster; same results as :func:`opdlens.diagnose.run.diagnose`.

    Args:
        config: a :class:`opdlens.diagnose.config.DiagnoseConfig` (its ``out_dir`` must be on a shared
            filesystem when the cluster has several nodes; see the module docstring).
        address: the cluster (``"auto"``: the running one, ``"ray://host:10001"``...); ``"local"``,
            None or ``""`` always start a fresh local cluster (Ray's own default, None, would
            attach to ``RAY_ADDRESS`` or to the last cluster started on this machine). When Ray
            is already initialised in this process it is used as is.
        num_workers: number of actors; default: one per GPU when ``config.device`` is CUDA and
            the cluster has GPUs, else one per CPU of the cluster.
        policy_factory: builds each actor's models and questions (default:
            :class:`ConfigFactory` of ``config``); any picklable :class:`WorkerFactory`.
        progress: show a progress bar of finished jobs on the driver.
        max_restarts: restarts of a crashed actor (its in-flight calls are retried by Ray).
        max_job_attempts: how often a job is given to another actor after its actor died.
        on_result: called on the driver after every finished job with the number of finished
            jobs and the actor handles (monitoring; the tests kill actors from it).

    Returns:
        The :class:`~opdlens.diagnose.store.RunStore` of ``config.out_dir``.
    """
    try:
        import ray
        from ray.exceptions import RayActorError
    except ImportError as exc:  # pragma: no cover - ray is in the dev extra
        raise OpdlensError("--ray needs Ray: pip install 'ray[default]'") from exc

    factory: WorkerFactory = policy_factory if policy_factory is not None else ConfigFactory(config)
    store = RunStore(config.out_dir)
    if policy_factory is None:
        write_config(store, config)
    qids = factory.question_ids()
    if not qids:
        raise OpdlensError("no questions to diagnose: the task returned an empty question set")
    if len(set(qids)) != len(qids):
        raise OpdlensError("question ids must be unique")
    store.check_names("question", qids)
    if isinstance(factory, ConfigFactory):  # the same question checks as a single-process run
        inputs = factory.inputs()
        check_questions(store, inputs, [t.name for t in config.teachers])
        store.write_table("inputs.parquet", inputs)

    started = False
    if not ray.is_initialized():
        ray.init(address=address or "local", include_dashboard=False, logging_level="WARNING")
        started = True
    actors: list[Any] = []
    try:
        resources = ray.cluster_resources()
        use_gpu = str(getattr(config, "device", "cpu")).startswith("cuda") and resources.get("GPU", 0) >= 1
        n = num_workers or int(resources.get("GPU" if use_gpu else "CPU", 1))
        n = max(1, min(n, len(qids) * 8))
        worker_cls = ray.remote(DiagnosisWorker).options(
            num_cpus=1, num_gpus=1 if use_gpu else 0, max_restarts=max_restarts, max_task_retries=max_restarts
        )
        out_dir = str(store.root.resolve())
        actors = [worker_cls.remote(factory, out_dir) for _ in range(n)]
        errors = [e for e in ray.get([a.ready.remote() for a in actors]) if e is not None]
        if errors:
            raise OpdlensError(errors[0])
        return _drive(ray, RayActorError, store, qids, actors, progress, max_job_attempts, on_result)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        if started:
            ray.shutdown()


def _drive(
    ray: Any,
    actor_error: type[BaseException],
    store: RunStore,
    qids: list[str],
    actors: list[Any],
    progress: bool,
    max_job_attempts: int,
    on_result: Callable[[int, list[Any]], None] | None,
) -> RunStore:
    """The driver's scheduling loop: hand jobs to idle actors until every job is done."""
    records: dict[str, dict[str, Any]] = {}
    phase1: deque[_Job] = deque()
    phase2: deque[_Job] = deque()

    def queue_scoring(qid: str, record: dict[str, Any]) -> None:
        for t in record["teachers"]:
            if not store.has(store.nodes_file(t, qid)):
                phase2.append(_Job(qid, t))

    for qid in qids:
        rec = read_phase1_record(store, qid)
        if rec is None:
            phase1.append(_Job(qid))
        else:
            records[qid] = rec
            queue_scoring(qid, rec)

    idle = list(actors)
    alive = list(actors)
    inflight: dict[Any, tuple[Any, _Job]] = {}
    attempts: Counter[_Job] = Counter()
    done = 0
    bar = tqdm(total=len(phase1) + len(phase2), desc="jobs", unit="job", disable=not progress)
    try:
        while phase1 or phase2 or inflight:
            while idle and (phase1 or phase2):
                job = phase2.popleft() if phase2 else phase1.popleft()
                actor = idle.pop()
                ref = actor.phase1.remote(job.qid) if job.teacher is None else actor.phase2.remote(job.qid, job.teacher)
                inflight[ref] = (actor, job)
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            actor, job = inflight.pop(ref)
            try:
                out = ray.get(ref)
            except actor_error:
                attempts[job] += 1
                if actor in alive:
                    alive.remove(actor)
                if attempts[job] >= max_job_attempts or not alive:
                    raise OpdlensError(
                        f"{job} failed: its worker died {attempts[job]} time(s) and "
                        f"{len(alive)} worker(s) are left; finished work is kept in {store.root}, rerun to resume"
                    ) from None
                (phase1 if job.teacher is None else phase2).appendleft(job)
                continue
            except OpdlensError as exc:
                cause = getattr(exc, "cause", exc)
                raise OpdlensError(f"{job}: {cause}") from None
            idle.append(actor)
            if job.teacher is None:
                records[job.qid] = out
                before = len(phase2)
                queue_scoring(job.qid, out)
                bar.total += len(phase2) - before
                bar.refresh()
            done += 1
            bar.update(1)
            if on_result is not None:
                on_result(done, list(alive))
    finally:
        bar.close()

    rows = [records[q]["summary"] for q in qids if records[q]["summary"] is not None]
    skips = [s for q in qids for s in records[q]["skips"]]
    write_run_tables(store, rows, skips, len(qids))
    return store
