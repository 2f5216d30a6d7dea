"""Tasks: questions, prompts, answer extraction and checking.

>>> from opdlens.tasks import get_task
>>> task = get_task("arith")                      # generated, no download
>>> qs = task.load(n=10, seed=0)
>>> task.check("... so 12 apples. Answer: 12", qs[0])   # doctest: +SKIP
>>> task.grade("<think>hmm", qs[0]).reason
'unterminated <think> (no answer)'

Registered tasks: ``arith`` (generated word problems), ``yesno`` (generated yes/no questions),
``boolq``, ``mmlu``, ``aime`` (hub datasets, or their local export via ``path=``), ``jsonl`` and
``parquet`` (users' own files), ``chat`` / ``verl`` (chat-message prompts of verl's Parquet and TRL's
prompt-only datasets, checked per ``data_source``).
"""

from opdlens.tasks.answers import (
    ANSWER_TYPES,
    answers_match,
    extract_answer,
    normalize_gold,
    strip_thinking,
)
from opdlens.tasks.arith import DEFAULT_DIFFICULTY, LEVELS, ArithTask
from opdlens.tasks.base import (
    CORRECT,
    INCORRECT,
    NO_ANSWER,
    UNFINISHED_THINKING,
    Grade,
    Question,
    Task,
    get_task,
    list_tasks,
    register_task,
)
from opdlens.tasks.chat import DATA_SOURCES, ChatTask, VerlTask, checker_for
from opdlens.tasks.hf import AIMETask, BoolQTask, HFTask, MMLUTask, load_hf_rows
from opdlens.tasks.local import JsonlTask, LocalFileTask, ParquetTask, iter_rows, read_rows
from opdlens.tasks.yesno import KINDS as YESNO_KINDS
from opdlens.tasks.yesno import YesNoTask

__all__ = [
    "ANSWER_TYPES",
    "CORRECT",
    "DATA_SOURCES",
    "DEFAULT_DIFFICULTY",
    "INCORRECT",
    "LEVELS",
    "NO_ANSWER",
    "UNFINISHED_THINKING",
    "YESNO_KINDS",
    "AIMETask",
    "ArithTask",
    "BoolQTask",
    "ChatTask",
    "Grade",
    "HFTask",
    "JsonlTask",
    "LocalFileTask",
    "MMLUTask",
    "ParquetTask",
    "Question",
    "Task",
    "VerlTask",
    "YesNoTask",
    "answers_match",
    "checker_for",
    "extract_answer",
    "get_task",
    "iter_rows",
    "list_tasks",
    "load_hf_rows",
    "normalize_gold",
    "read_rows",
    "register_task",
    "strip_thinking",
]
