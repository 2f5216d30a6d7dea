"""diagnose_ray on a local Ray cluster (2 CPUs): same results as one process, killed workers and
interrupted drivers resume to identical tables, bad input gives clear messages."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from opdlens.diagnose.config import DiagnoseConfig  # noqa: E402
from opdlens.diagnose.distributed import diagnose_ray, read_phase1_record  # noqa: E402
from opdlens.diagnose.store import RunStore  # noqa: E402
from opdlens.errors import OpdlensError  # noqa: E402
from opdlens.report.run import load_results  # noqa: E402
from tests import helpers  # noqa: E402
from tests.helpers import SyntheticFactory  # noqa: E402

KEY = ["teacher", "question_id", "path_id", "node"]
FACTORY = SyntheticFactory(seed=0, n_questions=3)


@pytest.fixture(scope="module")
def cluster():
    # the workers unpickle SyntheticFactory without importing tests.helpers (the tests folder
    # need not be on their path): its classes and functions travel by value
    ray.cloudpickle.register_pickle_by_value(helpers)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(helpers)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted single-process run of FACTORY, question by question as the Ray workers
    run them (the resident schedule: the sequential one samples the targeted rollouts of all
    questions together, so with several questions its rollouts draw other random numbers)."""
    out = tmp_path_factory.mktemp("reference")
    diag, envs = FACTORY(str(out))
    diag.config.schedule = "resident"
    diag.run(envs)
    return out


def _cfg(out: Path) -> DiagnoseConfig:
    return DiagnoseConfig(out_dir=str(out))


def _chunks(run: Path) -> dict[str, int]:
    """Rollout chunk files of a run and their number of rollouts."""
    store = RunStore(run)
    return {
        f"{f.parent.name}/{f.stem}": len(store.read_chunk(f.parent.name, f.stem))
        for f in sorted((run / "rollouts").rglob("*.parquet"))
    }


def assert_same_run(a: Path, b: Path) -> None:
    """Equal per-node, per-question, per-path and skip tables, and the same rollout chunks."""
    na, qa, pa = load_results(RunStore(a))
    nb, qb, pb = load_results(RunStore(b))
    pd.testing.assert_frame_equal(
        na.sort_values(KEY).reset_index(drop=True), nb.sort_values(KEY).reset_index(drop=True)
    )
    pd.testing.assert_frame_equal(qa, qb)
    pd.testing.assert_frame_equal(pa, pb)
    pd.testing.assert_frame_equal(RunStore(a).read_table("skips.parquet"), RunStore(b).read_table("skips.parquet"))
    assert _chunks(a) == _chunks(b)


class _InitCalled(Exception):
    pass


@pytest.mark.parametrize(
    ("given", "passed"),
    [(None, "local"), ("", "local"), ("local", "local"), ("auto", "auto"), ("ray://head:10001", "ray://head:10001")],
)
def test_local_address_always_starts_a_fresh_cluster(monkeypatch, tmp_path, given, passed):
    """``--ray local`` (and no address) must reach ray.init as "local": Ray's default None attaches to
    RAY_ADDRESS or to the last cluster recorded on the machine, which may be stale."""
    seen = []

    def fake_init(address=None, **kwargs):
        seen.append(address)
        raise _InitCalled

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    with pytest.raises(_InitCalled):
        diagnose_ray(_cfg(tmp_path), address=given, policy_factory=FACTORY, progress=False)
    assert seen == [passed]
    if given == "local":  # the CLI's --ray local
        from opdlens.cli import _run_diagnose

        with pytest.raises(_InitCalled):
            _run_diagnose(_cfg(tmp_path / "cli"), given)
        assert seen == [passed, "local"]


def test_ray_run_equals_single_process_run(cluster, reference, tmp_path):
    store = diagnose_ray(_cfg(tmp_path), num_workers=2, policy_factory=FACTORY, progress=False)
    assert_same_run(store.root, reference)
    nodes, questions, _ = load_results(store)
    assert questions["question_id"].tolist() == ["q0", "q1", "q2"]
    assert (questions["n_rollouts"] == 200).all() and questions["n_targeted"].gt(0).all()
    assert len(nodes) > 50 and set(nodes["teacher"]) == {"helpful", "harmful"}
    rec = read_phase1_record(store, "q1")
    assert rec is not None and rec["teachers"] == ["helpful", "harmful"] and rec["summary"]["n_rollouts"] == 200


def test_killed_workers_and_interrupted_driver_resume_to_identical_results(cluster, reference, tmp_path):
    # 1) kill one worker for good and restart the other mid-run: the run still completes
    killed: list[object] = []
    n_alive: list[int] = []

    def kill(done: int, actors: list[object]) -> None:
        n_alive.append(len(actors))
        if done == 1:
            killed.append(actors[0])
            ray.kill(actors[0], no_restart=True)  # its jobs go to the other worker
        elif done == 3:
            other = next(a for a in actors if a not in killed)
            ray.kill(other, no_restart=False)  # restarts; Ray retries its in-flight call

    store = diagnose_ray(
        _cfg(tmp_path / "killed"), num_workers=2, policy_factory=FACTORY, progress=False, on_result=kill
    )
    assert len(killed) == 1 and n_alive[0] == 2 and n_alive[-1] == 1  # the dead worker was dropped
    assert_same_run(store.root, reference)

    # 2) the driver dies after 4 finished jobs; the rerun finishes the rest, nothing is redone twice
    def crash(done: int, actors: list[object]) -> None:
        if done == 4:
            raise KeyboardInterrupt("simulated driver kill")

    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        diagnose_ray(_cfg(out), num_workers=2, policy_factory=FACTORY, progress=False, on_result=crash)
    n_nodes = len(list((out / "nodes").rglob("*.parquet"))) if (out / "nodes").exists() else 0
    assert not (out / "questions.parquet").exists() and n_nodes < 6  # 3 questions x 2 teachers
    assert len(list((out / "phase1").glob("*.parquet"))) >= 1  # finished work was kept
    before = {f: f.stat().st_mtime_ns for f in (out / "phase1").glob("*.parquet")}
    diagnose_ray(_cfg(out), num_workers=2, policy_factory=FACTORY, progress=False)
    assert all(f.stat().st_mtime_ns == t for f, t in before.items())  # finished phase-1 jobs not rerun
    assert_same_run(out, reference)


def test_too_long_prompt_is_a_recorded_skip_on_ray(cluster, tmp_path):
    factory = SyntheticFactory(seed=0, n_questions=3, prompt_lengths={"q1": 50})
    factory.max_context = 40
    store = diagnose_ray(_cfg(tmp_path), num_workers=2, policy_factory=factory, progress=False)
    nodes, questions, _ = load_results(store)
    assert questions["question_id"].tolist() == ["q0", "q2"]
    assert sorted(set(nodes["question_id"])) == ["q0", "q2"]
    skips = store.read_table("skips.parquet")
    assert skips["question_id"].tolist() == ["q1"] and skips["teacher"].tolist() == [""]
    assert "prompt of 50 tokens + max_new_tokens 10 = 60 exceeds the student's context of 40" in skips["reason"][0]


def test_unloadable_model_on_ray_gives_the_loader_message(cluster, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    cfg = DiagnoseConfig(student=str(empty), task="arith", n_questions=1, out_dir=str(tmp_path / "run"))
    with pytest.raises(OpdlensError, match="could not load model/tokenizer from directory"):
        diagnose_ray(cfg, num_workers=1, progress=False)
    with pytest.raises(OpdlensError, match="unknown task 'nope'; known tasks: .*arith"):
        diagnose_ray(cfg.model_copy(update={"task": "nope"}), num_workers=1, progress=False)


def test_config_models_loaded_in_the_actors_equal_diagnose(cluster, tmp_path):
    """The default ConfigFactory (models and task built inside the actor from the config, as
    `opdlens diagnose CONFIG --ray` does) gives the single-process `diagnose` results."""
    from opdlens.diagnose.run import diagnose
    from opdlens.models import load_tokenizer, tiny_random_policy

    model_dir = tmp_path / "tiny"
    tiny_random_policy(seed=0, init_std=0.5).model.save_pretrained(model_dir)
    load_tokenizer("smollm2").save_pretrained(model_dir)
    cfg = DiagnoseConfig(
        student=str(model_dir),
        task="arith",
        n_questions=2,
        rollouts_per_question=8,
        max_new_tokens=6,
        teachers=[{"name": "plain"}, {"name": "Self-1C1W", "context": "1c1w"}],
        out_dir=str(tmp_path / "ray"),
        targeting={"first_window": 2, "visit_target": 8, "max_rollouts_per_path": 16},
        fallback_reference_solution=True,  # a random model never answers: show the reference answer (recorded)
    )
    store = diagnose_ray(cfg, num_workers=1, progress=False)
    assert (store.root / "config.yaml").exists()
    diagnose(cfg.model_copy(update={"out_dir": str(tmp_path / "single"), "schedule": "resident"}), progress=False)
    assert_same_run(tmp_path / "ray", tmp_path / "single")
    nodes, questions, _ = load_results(store)
    assert set(nodes["teacher"]) == {"plain", "Self-1C1W"} and (questions["n_rollouts"] == 8).all()
