"""A diagnose run from its configuration: the task's questions, the student and the scheduled
models loaded, the :class:`~opdlens.diagnose.diagnosis.Diagnosis` built and run into its run
directory (locked, fingerprinted, resumable)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from opdlens.diagnose.diagnosis import Diagnosis
from opdlens.diagnose.questions import Messages, QuestionEnv, task_envs
from opdlens.diagnose.schedule import ModelSlot, Teacher
from opdlens.diagnose.state import Runtime
from opdlens.diagnose.store import RunStore, derive_seed, start_fresh
from opdlens.errors import OpdlensError
from opdlens.policy import Policy, check_same_tokenizer

if TYPE_CHECKING:
    from opdlens.diagnose.config import DiagnoseConfig


def diagnose(config: Any, *, progress: bool = True, fresh: bool = False) -> RunStore:
    """Run a :class:`opdlens.config.DiagnoseConfig` end to end (phases 1 and 2) into its out_dir.

    The run directory is locked while the run writes into it (a second run on it fails at once)
    and is checked writable before any model loads. It resumes only a run of the same
    fingerprint (:func:`write_config`: the result keys and the contents of local models) and of
    the same questions (:func:`check_questions`: each question's prompt and gold answer);
    ``fresh`` first moves an existing run directory aside (``<out_dir>.old-<time>``) and starts
    a new run.
    """
    if fresh:
        start_fresh(config.out_dir)
    store = RunStore(config.out_dir)
    store.check_writable()
    with store.lock():
        write_config(store, config)
        diag, envs = build_diagnosis(config, progress=progress)
        inputs = inputs_frame(envs)
        check_questions(store, inputs, [t.spec.name for t in diag.teachers])
        store.write_table("inputs.parquet", inputs)
        diag.run(envs)
    return store


def model_specs(config: Any) -> list[str]:
    """The model specs a diagnose config loads: student, teachers, summariser, solution model."""
    specs = [config.student, *(t.model for t in config.teachers), config.summarizer, config.solution_model]
    return [s for s in specs if s]


def write_config(store: RunStore, config: Any) -> None:
    """Save the run's configuration as ``config.yaml`` and its fingerprint as ``fingerprint.json``:
    the keys that determine results (:func:`opdlens.identity.result_keys`) and the digests of its
    local models' contents (:func:`opdlens.identity.model_digest`; hub ids: the cached revision).

    A directory that already holds rollouts or scores must have the same fingerprint: otherwise
    one error names the differing keys (stored and new values) and changed models, and how to
    start afresh. A directory with nothing stored (e.g. a first attempt that failed to load a
    model) takes the new configuration. Both files are rewritten on every run, so they always
    describe it.
    """
    import yaml

    from opdlens.config import overrides_comment
    from opdlens.identity import (
        describe_input_changes,
        describe_mismatch,
        fingerprint_record,
        model_digests,
        result_keys,
        stored_inputs,
        stored_result_keys,
    )

    keys = result_keys(config)
    inputs = model_digests(model_specs(config))
    old_inputs = stored_inputs(store.root)
    if store.has_results():
        stored = stored_result_keys(store.root, type(config))
        why = [
            x
            for x in (
                describe_mismatch(stored, keys) if stored is not None else None,
                describe_input_changes(old_inputs, inputs),
            )
            if x
        ]
        if why:
            raise OpdlensError(
                f"run directory {store.root} holds results of another configuration ({'; '.join(why)}). "
                "Rerun with the stored settings to resume, choose another out_dir, or pass --fresh "
                "to move the old run aside and start afresh"
            )
        # a digest this run cannot compute (a hub model no longer cached) stays recorded
        wanted = {f"model {s}" for s in model_specs(config)}
        inputs = {**{k: v for k, v in old_inputs.items() if k in wanted}, **inputs}
    store.write_text("fingerprint.json", fingerprint_record(keys, inputs))
    text = overrides_comment(config) + yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    store.write_text("config.yaml", text)


def inputs_frame(envs: Sequence[QuestionEnv]) -> pd.DataFrame:
    """``inputs.parquet``: per question its id, prompt text and gold answer."""
    return pd.DataFrame(
        {
            "question_id": [e.id for e in envs],
            "question_text": [e.question_text for e in envs],
            "gold": [e.gold for e in envs],
        }
    )


def _cell(x: Any) -> str | None:
    return None if x is None or (isinstance(x, float) and x != x) else str(x)


def check_questions(store: RunStore, inputs: pd.DataFrame, teachers: Sequence[str] = ()) -> None:
    """Refuse questions a run cannot hold or resume with (one error each):

    * ids (or teacher names) whose file names collide (:meth:`RunStore.check_names`);
    * in a directory that holds results, questions whose prompt text or gold answer differ from
      the stored ``inputs.parquet`` (the stored rollouts were sampled on the old prompt and graded
      against the old answer), and stored questions the data no longer has (their results would
      be reported with the new ones). New questions are fine: they are computed.
    """
    ids = [str(x) for x in inputs["question_id"]]
    store.check_names("question", ids)
    store.check_names("teacher", list(teachers))
    if not store.has_results() or not store.has("inputs.parquet"):
        return
    old = store.read_table("inputs.parquet")
    before = {
        str(r.question_id): (_cell(r.question_text), _cell(r.gold))
        for r in old.itertuples(index=False)
        if "question_text" in old.columns
    }
    now = {q: (_cell(t), _cell(g)) for q, t, g in zip(ids, inputs["question_text"], inputs["gold"])}
    changed = [q for q in now if q in before and before[q] != now[q]]
    gone = [q for q in before if q not in now]

    def names(qs: list[str]) -> str:
        return ", ".join(map(repr, qs[:8])) + (f" and {len(qs) - 8} more" if len(qs) > 8 else "")

    problems = []
    if changed:
        problems.append(f"question(s) {names(changed)} have another prompt or gold answer than the stored ones")
    if gone:
        problems.append(f"question(s) {names(gone)} are no longer in the data")
    if problems:
        raise OpdlensError(
            f"run directory {store.root} holds results of other questions: {'; '.join(problems)} "
            f"(see {store.root / 'inputs.parquet'}). Restore the data to resume, choose another out_dir, "
            "or pass --fresh to move the old run aside and start afresh"
        )


def vllm_engine(config: Any, student: Any) -> Any:
    """The student's vLLM sampler of a ``rollout_engine: vllm`` config (same EOS ids and dtype as
    the loaded student, which still scores and writes the tree).

    Called after the student is loaded and before the config's other models: on CUDA, vLLM's
    ``gpu_memory_utilization`` (unless given in ``vllm_options``) is sized so that the teachers,
    summariser and solution model still to load fit beside it (see
    :func:`opdlens.rollout.vllm_engine.memory_share`)."""
    from opdlens import models
    from opdlens.rollout import VLLMEngine
    from opdlens.rollout import vllm_engine as ve

    if config.student == models.SMOLLM2:
        raise OpdlensError(
            "rollout_engine: vllm needs the student as a hub id or a local model directory; "
            "the embedded 'smollm2' GGUF runs with rollout_engine: torch"
        )
    opts = dict(config.vllm_options)
    if config.dtype:
        opts.setdefault("dtype", config.dtype)
    opts.setdefault("seed", config.seed)
    mem = ve.device_memory(config.device)
    if mem is not None:
        dtype = next(student.model.parameters()).dtype
        later = {spec.model for spec in config.teachers} | {config.summarizer, config.solution_model}
        later -= {None, config.student}  # the student's own spec is the already loaded student
        opts["gpu_memory_utilization"] = ve.memory_share(
            free=mem[0],
            total=mem[1],
            student_bytes=models.spec_weight_bytes(config.student, dtype),
            # the sequential schedule holds one of them at a time, the resident one all together
            later_bytes=(max if config.schedule == "sequential" else sum)(
                [models.spec_weight_bytes(m, dtype) for m in sorted(later)] or [0]
            ),
            requested=opts.get("gpu_memory_utilization"),
        )
    return VLLMEngine.from_model(config.student, eos_token_ids=sorted(student.eos_token_ids), **opts)


def build_diagnosis(config: Any, *, progress: bool = True) -> tuple[Diagnosis, list[QuestionEnv]]:
    """Load the task, questions and student of a :class:`opdlens.config.DiagnoseConfig`: the
    :class:`Diagnosis` writing into ``config.out_dir`` and the question environments. Teachers,
    the summariser and the solution model are :class:`ModelSlot` objects the schedule loads when
    needed (their tokenizers are checked against the student's now)."""
    from opdlens.models import chat_encoder, check_spec_tokenizer, load_policy
    from opdlens.tasks import get_task

    store = RunStore(config.out_dir)
    task = get_task(config.task, **config.task_args)
    questions = task.load(split=config.split, n=config.n_questions, seed=config.seed)
    student = load_policy(config.student, device=config.device, dtype=config.dtype)
    student.use_engine_config(config.engine)
    if config.rollout_engine == "vllm":
        student.engine = vllm_engine(config, student)
    slots: dict[str, ModelSlot] = {}

    def slot(spec: str) -> ModelSlot:
        if spec not in slots:
            check_spec_tokenizer(student, spec)
            slots[spec] = _model_slot(spec, student, config)
        return slots[spec]

    teachers = []
    for t in config.teachers:
        thinking = config.thinking if t.thinking is None else t.thinking
        if t.model is None:
            teachers.append(Teacher(t, student, lambda m, th=thinking: student.encode_chat(m, thinking=th)))
        else:
            teachers.append(Teacher(t, slot(t.model), chat_encoder(t.model, thinking)))
    summ = slot(config.summarizer) if config.summarizer else None
    summ_encode = (
        chat_encoder(config.summarizer, config.summarizer_thinking)
        if config.summarizer
        else (lambda m: student.encode_chat(m, thinking=config.summarizer_thinking))
    )
    # the one resolved copy of the configuration the diagnosis reads (the stored config.yaml keeps null)
    config = config.model_copy(update={"max_new_tokens": config.token_budget(task)})
    runtime = Runtime(
        summarizer=summ,
        summarizer_encode=summ_encode,
        summarizer_decode=(lambda toks: summ.get().decode(toks)) if summ is not None else student.decode,
    )
    if config.solution_model:
        runtime.solution_slot = slot(config.solution_model)
        runtime.solution_writer = _solution_writer(
            runtime.solution_slot,
            chat_encoder(config.solution_model, config.solution_thinking),
            task,
            questions,
            config,
        )
    diag = Diagnosis(store, student, teachers, config, runtime, progress=progress)
    return diag, task_envs(task, questions, student, config.thinking)


def _model_slot(spec: str, student: Any, config: Any) -> ModelSlot:
    """A scheduled model: loaded with the run's device and dtype, checked against the student's
    vocabulary once loaded, and freed with :func:`opdlens.models.release_policy`."""
    from opdlens.models import load_policy, release_policy, spec_max_context

    def load() -> Policy:
        free = getattr(student, "free_engine_caches", None)
        if free is not None:  # the student's decode buffers (up to 40% of the free GPU memory) go first
            free()
        policy = load_policy(spec, device=config.device, dtype=config.dtype)
        policy.model.requires_grad_(False)  # inference only (lets the engine fuse weights without a copy)
        check_same_tokenizer(student, policy)
        return policy

    def release(policy: Policy) -> None:
        if policy is not student:  # another spelling of the student's spec: the loader's cache gave the student
            release_policy(policy)

    return ModelSlot(load, release, spec, spec_max_context(spec))


def _solution_writer(
    slot: ModelSlot,
    encode: Callable[[Messages], list[int]],
    task: Any,
    questions: Sequence[Any],
    config: DiagnoseConfig,
) -> Callable[[QuestionEnv], tuple[str | None, str]]:
    """A function writing one correct solution per question with another (bigger) model, with
    the run's generation budget (``config.max_new_tokens``, resolved); (None, reason) when none of
    ``config.solution_tries`` samples at ``config.solution_temperature`` is correct."""
    by_id = {q.id: q for q in questions}
    seed, tries, max_new_tokens = config.seed, config.solution_tries, int(config.max_new_tokens or 0)

    def write(env: QuestionEnv) -> tuple[str | None, str]:
        q = by_id[env.id]
        model = slot.get()
        ids = encode([{"role": "user", "content": q.prompt}])
        comps = model.sample(
            [ids],
            tries,
            max_new_tokens,
            seed=derive_seed(seed, env.id, "external"),
            temperature=config.solution_temperature,
        )
        for c in comps[0]:
            text = model.decode([t for t in c.tokens if t not in model.eos_token_ids])
            if task.check(text, q):
                return text, ""
        return None, f"the solution model wrote no correct solution in {tries} tries of <= {max_new_tokens} tokens"

    return write
