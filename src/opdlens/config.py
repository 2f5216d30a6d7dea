"""Configuration machinery shared by every command: YAML reading with errors that say what to
fix, the settings diagnose and train have in common (:class:`RunSettings`), and command-line
overrides (``KEY=VALUE``). What makes two runs the same run is :mod:`opdlens.identity`.

The commands' own configs live beside their code: :class:`opdlens.diagnose.config.DiagnoseConfig`
and :class:`opdlens.opd.config.TrainConfig`.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from opdlens.errors import OpdlensError
from opdlens.sampling import Truncation


class HasBudget(Protocol):
    max_new_tokens: int


class RunSettings(BaseModel):
    """The settings ``opdlens diagnose`` and ``opdlens train`` share, under the same names and
    defaults: which student, on which task, and how it samples. Every number must be finite
    (``.inf`` and ``.nan`` are refused, in this model and in those that extend it)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    student: str = Field(
        "smollm2", min_length=1, description="'smollm2' (embedded), a local model directory or a HF hub id"
    )
    task: str = Field("arith", min_length=1, description="registered task name (`opdlens tasks` lists them)")
    task_args: dict[str, Any] = Field(default_factory=dict, description="passed to the task, e.g. path= for jsonl")
    max_new_tokens: int | None = Field(
        None, ge=1, description="generation budget of a rollout (default: the task's own)"
    )
    temperature: float = Field(1.0, gt=0, description="student sampling temperature")
    top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        description="student sampling: keep the most probable tokens whose mass reaches top_p, renormalised "
        "(1: off; applied after min_p and top_k, as vLLM does: opdlens.sampling)",
    )
    top_k: int = Field(0, ge=0, description="student sampling: keep the top_k most probable tokens (0: off)")
    min_p: float = Field(
        0.0, ge=0, lt=1, description="student sampling: drop tokens below min_p x the most probable one's (0: off)"
    )
    seed: int = Field(0, ge=0, description="run seed; every sampling seed derives from it")
    #: The command-line overrides this config was read with (:func:`apply_overrides`), recorded in
    #: the run's stored ``config.yaml`` (:func:`overrides_comment`); their values are in the fields.
    _overrides: list[str] = PrivateAttr(default_factory=list)

    @property
    def overrides(self) -> list[str]:
        """The command-line overrides applied to this config's file (``KEY=VALUE``, in order)."""
        return list(self._overrides)

    @property
    def truncation(self) -> Truncation:
        """The student's sampling truncation (``top_p``, ``top_k``, ``min_p``)."""
        return Truncation(self.top_p, self.top_k, self.min_p)

    def token_budget(self, task: HasBudget) -> int:
        """The generation budget of a rollout: ``max_new_tokens``, else the task's own (the one rule)."""
        return int(self.max_new_tokens or task.max_new_tokens)


#: Largest config file read (bytes). Configs are a few kilobytes; the bound keeps a stray file
#: (a log, a data set) from being parsed for minutes.
MAX_YAML_BYTES = 128 * 1024
#: Most values a config may hold once its aliases are expanded (an alias counts the whole value
#: it repeats, at every use). Configs hold hundreds; an alias bomb (``a: &a [x, x]``,
#: ``b: &b [*a, *a]``, ...) grows exponentially and is refused before anything expands it.
MAX_YAML_VALUES = 100_000


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys (YAML requires keys to be unique; PyYAML
    silently keeps the last value)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<' merges: its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: the base class names it
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first at line {first.start_mark.line + 1}, again at line "
                        f"{key_node.start_mark.line + 1}): each key may appear once; keep the value you mean",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """The number of values of a composed YAML document with every alias expanded (computed on
    the node graph, where an alias is a shared node, so without expanding anything); raises
    ``ValueError`` past ``limit`` or for an alias that contains itself."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise ValueError("an alias refers to a value that contains it (a recursive structure)")
        open_.add(key)
        n = 1
        if isinstance(node, yaml.SequenceNode):
            n += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            n += sum(size(k) + size(v) for k, v in node.value)
        open_.discard(key)
        if n > limit:
            raise ValueError(
                f"it expands to more than {limit} values (aliases counted at every use): "
                "write the values out, or check for an alias bomb"
            )
        sizes[key] = n
        return n

    return size(root)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file; errors name the file, the line and what is wrong.

    Bounded work: files over :data:`MAX_YAML_BYTES`, documents expanding (aliases) to more than
    :data:`MAX_YAML_VALUES` values and structures nested too deeply are refused before they are
    built; so are duplicate keys."""
    p = Path(path)
    if not p.is_file():
        raise OpdlensError(f"config file {p} does not exist")
    size = p.stat().st_size
    if size > MAX_YAML_BYTES:
        raise OpdlensError(
            f"config {p} is {size} bytes, more than the {MAX_YAML_BYTES} a config may have: "
            "is it the right file? (put data in a task file, e.g. task: jsonl)"
        )
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise OpdlensError(f"config {p} is not UTF-8 text (line {line}): save it as UTF-8") from None
    loader = None
    try:
        loader = _ConfigLoader(text)  # its reader refuses control characters at once
        node = loader.get_single_node()
        if node is not None:
            _expanded_size(node, MAX_YAML_VALUES)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise OpdlensError(f"config {p} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise OpdlensError(f"config {p} is nested too deeply to be a config") from None
    except OpdlensError:
        raise
    except ValueError as exc:  # the size bound, a recursive alias, an integer of thousands of digits
        raise OpdlensError(f"config {p} cannot be read: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()
    if data is None or data == {}:
        raise OpdlensError(
            f"config {p} is empty: add at least 'student', 'task' and 'teachers' "
            "(see configs/diagnose-smollm2.yaml for a complete example)"
        )
    if not isinstance(data, dict):
        raise OpdlensError(f"config {p} must be a mapping of keys to values, got {type(data).__name__}")
    return data


def _non_finite(value: Any, loc: str = "") -> list[str]:
    """Where a JSON-like tree holds an infinite or NaN float (dotted names, ``a.b[2]``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [loc or "(root)"]
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in _non_finite(v, f"{loc}.{k}" if loc else str(k))]
    if isinstance(value, list | tuple):
        return [x for i, v in enumerate(value) for x in _non_finite(v, f"{loc}[{i}]")]
    return []


def validate_config(cls: type[BaseModel], data: dict[str, Any], where: str) -> Any:
    """``cls.model_validate(data)`` with pydantic's errors rewritten as one readable message.
    A number that is not finite (YAML's ``.inf``, ``.nan``) is refused anywhere in ``data``,
    free-form mappings such as ``task_args`` and ``vllm_options`` included."""
    bad = _non_finite(data)
    if bad:
        lines = [f"  {loc}: must be a finite number, not inf or nan" for loc in bad]
        raise OpdlensError(f"config {where} has {len(lines)} problem(s):\n" + "\n".join(lines))
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        lines = [_problem(err) for err in exc.errors()]
        raise OpdlensError(f"config {where} has {len(lines)} problem(s):\n" + "\n".join(lines)) from None


def _problem(err: Any) -> str:
    """One line of a pydantic error: where and what (an unknown key is called a likely typo)."""
    loc = ".".join(str(x) for x in err["loc"]) or "(root)"
    if err["type"] == "extra_forbidden":
        return f"  {loc}: unknown key (a typo?)"
    return f"  {loc}: {err['msg']}"


def load_yaml(cls: type[BaseModel], path: str | Path, overrides: Sequence[str] = ()) -> Any:
    """Parse and validate a YAML config file into ``cls``, with command-line ``overrides``
    (:func:`apply_overrides`) applied first and recorded on the result (:func:`set_overrides`)."""
    data = apply_overrides(read_yaml(path), overrides, cls)
    return set_overrides(validate_config(cls, data, config_where(path, overrides)), overrides)


# ---------------------------------------------------------------------- command-line overrides
#: The comment line of a stored ``config.yaml`` that records the command-line overrides of the run
#: (a JSON list after it); YAML readers ignore it, :func:`stored_overrides` reads it back.
OVERRIDES_COMMENT = "# command-line overrides: "


def config_where(path: str | Path, overrides: Sequence[str] = ()) -> str:
    """How a config's errors name it: the file, and the overrides applied to it."""
    return str(path) + (f" (with overrides {' '.join(overrides)})" if overrides else "")


def _override_value(text: str) -> Any:
    """An override's value as YAML reads it (a scalar or a flow collection: ``10``, ``null``,
    ``true``, ``[1, 2]``, ``{a: 1}``), with ``1e-5`` a number (PyYAML's YAML 1.1 wants ``1.0e-5``)."""
    loader = _ConfigLoader(text)
    try:
        value = loader.get_single_data()
    finally:
        loader.dispose()
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", text.strip()):
        return float(text)
    return value


def _model_of(annotation: Any) -> Any:
    """What a field annotation holds, for walking overrides: a pydantic model class, ``("list",
    item)`` for a list or tuple, ``("dict", value)`` for a mapping, or None (a scalar, or anything
    free-form, whose keys are not checked)."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        held = [m for m in (_model_of(a) for a in typing.get_args(annotation) if a is not type(None)) if m]
        return held[0] if len(held) == 1 else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return ("list", args[0] if args else Any)
    if origin is dict:
        args = typing.get_args(annotation)
        return ("dict", args[1] if len(args) == 2 else Any)
    return None


def _default_of(model: type[BaseModel], key: str) -> Any:
    """The JSON-able default of field ``key`` of ``model`` (what a config that leaves it out gets)."""
    field = model.model_fields[key]
    if field.is_required():
        return None
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True)
    if isinstance(value, list | tuple):
        return [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    return value


def apply_overrides(
    raw: dict[str, Any], overrides: Sequence[str], cls: type[BaseModel] | None = None
) -> dict[str, Any]:
    """``raw`` (a config as read from YAML) with each ``KEY=VALUE`` of ``overrides`` set, in order:
    ``signals.min_visits=10``, ``teachers.0.model=Qwen/Qwen3-1.7B``, ``task_args={path: d.jsonl}``.

    ``KEY`` is dotted; a number names a list index. ``VALUE`` is read as YAML (a scalar or a flow
    collection: ``[1, 2]``, ``null``, ``true``). With ``cls`` (the config's model) every key is
    checked against it: an unknown key, a missing or out-of-range index, or a key inside a plain
    value is an :class:`OpdlensError` naming the override; keys inside free-form mappings
    (``task_args``, ``vllm_options``) are not checked. A section or list the file leaves out starts
    from its default (``teachers.0.model=...`` edits the default teachers). ``raw`` is not changed;
    the result goes through the config's own validation as a file would."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, eq, text = item.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(p.strip() for p in parts):
            raise OpdlensError(
                f"override {item!r} is not KEY=VALUE (a dotted key, e.g. signals.min_visits=10 or teachers.0.model=ID)"
            )
        parts = [p.strip() for p in parts]
        try:
            value = _override_value(text)
        except yaml.YAMLError as exc:
            raise OpdlensError(
                f"override {item!r}: the value is not valid YAML ({getattr(exc, 'problem', exc)})"
            ) from None
        _set_path(out, parts, value, item, cls)
    return out


def _set_path(root: dict[str, Any], parts: list[str], value: Any, item: str, cls: Any) -> None:
    cur: Any = root
    schema: Any = cls  # a model class, ("list"|"dict", inner), or None: not checked
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the config"
        last = i == len(parts) - 1
        if isinstance(cur, list):
            if not part.isdigit():
                raise OpdlensError(f"override {item!r}: {where} is a list: {part!r} is not an index (0, 1, ...)")
            index = int(part)
            if index >= len(cur):
                raise OpdlensError(
                    f"override {item!r}: {where} has {len(cur)} item(s) (indices 0 to {len(cur) - 1}), no index {index}"
                )
            inner = schema[1] if isinstance(schema, tuple) else None
            schema = _model_of(inner) if inner is not None else None
            if last:
                cur[index] = value
            else:
                cur = cur[index]
            continue
        if not isinstance(cur, dict):
            raise OpdlensError(
                f"override {item!r}: {where} is a single value ({cur!r}), not a section: it has no key {part!r}"
            )
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            if part not in schema.model_fields:
                known = sorted(schema.model_fields)
                close = difflib.get_close_matches(part, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise OpdlensError(
                    f"override {item!r}: unknown key {'.'.join(parts[: i + 1])!r}{hint}; "
                    f"the keys of {where} are: {', '.join(known)}"
                )
            if not last and part not in cur:
                cur[part] = _default_of(schema, part)
            held = schema.model_fields[part].annotation
            schema = _model_of(held)
        elif isinstance(schema, tuple):
            schema = _model_of(schema[1])
        else:
            schema = None
        if last:
            cur[part] = value
        else:
            if cur.get(part) is None:
                cur[part] = {}
            cur = cur[part]


def set_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """Record ``overrides`` on a validated config (its stored ``config.yaml`` lists them); returns it."""
    if overrides:
        config._overrides = list(overrides)
    return config


def overrides_comment(config: Any) -> str:
    """The :data:`OVERRIDES_COMMENT` line of a config's stored YAML ("" without overrides)."""
    overrides = getattr(config, "_overrides", None) or []
    return f"{OVERRIDES_COMMENT}{json.dumps(list(overrides))}\n" if overrides else ""


def stored_overrides(path: str | Path) -> list[str]:
    """The command-line overrides a stored ``config.yaml`` records (``[]``: none, or unreadable)."""
    try:
        with Path(path).open(encoding="utf-8") as f:
            first = f.readline()
        if first.startswith(OVERRIDES_COMMENT):
            found = json.loads(first[len(OVERRIDES_COMMENT) :])
            return [str(x) for x in found] if isinstance(found, list) else []
    except (OSError, ValueError):
        pass
    return []
