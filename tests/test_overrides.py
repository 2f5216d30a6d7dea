"""Command-line overrides (``opdlens diagnose CFG KEY=VALUE ...``, ``opdlens train``): one function,
:func:`opdlens.config.apply_overrides`, for both commands; recorded in the stored config.yaml."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from opdlens.cli import app
from opdlens.config import apply_overrides, stored_overrides
from opdlens.diagnose.config import DiagnoseConfig, read_run_config
from opdlens.errors import OpdlensError
from opdlens.identity import fingerprint, result_keys
from opdlens.opd.cli import load_train_config
from opdlens.opd.config import TrainConfig

runner = CliRunner()


def test_values_are_yaml_and_keys_are_dotted():
    raw = {"student": "smollm2", "teachers": [{"name": "a", "context": "1c"}], "signals": {"min_visits": 5}}
    out = apply_overrides(
        raw,
        [
            "signals.min_visits=10",
            "teachers.0.model=org/model",
            "task_args={path: d.jsonl, answer_type: int}",
            "targeting_teachers=[a]",
            "dtype=null",
            "thinking=true",
            "seed=3",
            "temperature=7e-1",  # PyYAML reads 7e-1 as text: a number here
            "student=a=b",  # only the first '=' splits
        ],
        DiagnoseConfig,
    )
    assert raw["signals"] == {"min_visits": 5} and "model" not in raw["teachers"][0]  # not changed in place
    assert out["signals"] == {"min_visits": 10}
    assert out["teachers"] == [{"name": "a", "context": "1c", "model": "org/model"}]
    assert out["task_args"] == {"path": "d.jsonl", "answer_type": "int"}
    assert (out["targeting_teachers"], out["dtype"], out["thinking"], out["seed"]) == (["a"], None, True, 3)
    assert out["temperature"] == 0.7 and out["student"] == "a=b"
    # a section or list the file leaves out starts from its default
    cfg = DiagnoseConfig.model_validate(
        apply_overrides({}, ["teachers.1.model=x/y", "engine.max_batch_rows=8"], DiagnoseConfig)
    )
    default = DiagnoseConfig()
    assert [t.name for t in cfg.teachers] == [t.name for t in default.teachers]
    assert cfg.teachers[1].model == "x/y" and cfg.teachers[0] == default.teachers[0]
    assert cfg.engine.max_batch_rows == 8
    # free-form mappings take any key
    assert apply_overrides({}, ["vllm_options.enforce_eager=true"], DiagnoseConfig) == {
        "vllm_options": {"enforce_eager": True}
    }
    t = apply_overrides({"lr": 1e-6}, ["lr=1e-5", "betas.0=0.8", "cold_start.lr=2e-5"], TrainConfig)
    assert t == {"lr": 1e-5, "betas": [0.8, 0.999], "cold_start": {"lr": 2e-5}}
    TrainConfig.model_validate(t)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("signals.min_visit=10", "unknown key 'signals.min_visit' (did you mean 'min_visits'?)"),
        ("sede=1", "unknown key 'sede' (did you mean 'seed'?)"),
        ("teachers.3.model=x", "teachers has 1 item(s) (indices 0 to 0), no index 3"),
        ("teachers.first.model=x", "teachers is a list: 'first' is not an index"),
        ("seed.x=1", "seed is a single value (0), not a section"),
        ("min_visits", "is not KEY=VALUE"),
        ("signals..min_visits=1", "is not KEY=VALUE"),
        ("seed=[1,", "the value is not valid YAML"),
    ],
)
def test_bad_overrides_name_the_override(override, message):
    with pytest.raises(OpdlensError) as e:
        apply_overrides({"teachers": [{"name": "a"}]}, [override], DiagnoseConfig)
    assert f"override {override!r}" in str(e.value) and message in str(e.value)


def test_diagnose_overrides_reach_the_run_and_its_stored_config(tmp_path, monkeypatch):
    import opdlens.diagnose.run
    from opdlens.diagnose.run import write_config
    from opdlens.diagnose.store import RunStore
    from opdlens.report.run import RunResults

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"out_dir: {tmp_path / 'run'}\nteachers:\n  - {{name: T, context: 1c}}\n")
    seen = {}

    def fake(cfg, fresh=False):
        seen["cfg"] = cfg
        raise KeyboardInterrupt

    monkeypatch.setattr(opdlens.diagnose.run, "diagnose", fake)
    args = ["diagnose", str(cfg_file), "signals.min_visits=10", "teachers.0.model=smollm2", "--fresh"]
    res = runner.invoke(app, args)
    assert res.exit_code == 130, res.output
    cfg = seen["cfg"]
    assert cfg.signals.min_visits == 10 and cfg.teachers[0].model == "smollm2"
    assert cfg.overrides == ["signals.min_visits=10", "teachers.0.model=smollm2"]
    plain = DiagnoseConfig.from_yaml(cfg_file)
    assert fingerprint(result_keys(cfg)) != fingerprint(result_keys(plain))  # part of the run's identity
    store = RunStore(tmp_path / "run")
    write_config(store, cfg)
    stored = store.root / "config.yaml"
    assert stored_overrides(stored) == cfg.overrides
    assert yaml.safe_load(stored.read_text())["signals"]["min_visits"] == 10  # the values, in the config itself
    back = read_run_config(stored)
    assert back == cfg and back.overrides == cfg.overrides
    choices = RunResults(*[None] * 4, config=back).choices  # type: ignore[arg-type]
    assert choices is not None and choices["command-line overrides"] == "signals.min_visits=10 teachers.0.model=smollm2"
    # the stored file, read as a config file, is the same run (the comment is only a record)
    assert DiagnoseConfig.from_yaml(stored).model_dump() == cfg.model_dump()
    # errors: the config's own messages, saying the overrides were applied; unknown keys named
    res = runner.invoke(app, ["diagnose", str(cfg_file), "signals.min_visits=0"])
    assert res.exit_code == 2 and "with overrides signals.min_visits=0" in res.output
    assert "signals.min_visits" in res.output
    res = runner.invoke(app, ["diagnose", str(cfg_file), "signals.min_visit=3"])
    assert res.exit_code == 2 and "unknown key 'signals.min_visit'" in res.output


def test_train_overrides(tmp_path):
    from opdlens.opd.__main__ import main as module_main

    f = tmp_path / "train.yaml"
    f.write_text("train:\n  steps: 5\n  lr: 1.0e-6\n")  # nested under train: overrides are relative to it
    cfg = load_train_config(f, ["steps=2", "lr=1e-5", "cold_start.epochs=2"])
    assert (cfg.steps, cfg.lr, cfg.cold_start.epochs) == (2, 1e-5, 2)
    assert cfg.overrides == ["steps=2", "lr=1e-5", "cold_start.epochs=2"]
    cfg.to_yaml(tmp_path / "config.yaml")
    assert stored_overrides(tmp_path / "config.yaml") == cfg.overrides
    assert TrainConfig.from_yaml(tmp_path / "config.yaml").model_dump() == cfg.model_dump()
    res = runner.invoke(app, ["train", str(f), "lr=-1"])
    assert res.exit_code == 2 and "lr must be > 0" in res.output
    res = runner.invoke(app, ["train", str(f), "step=3"])
    assert res.exit_code == 2 and "unknown key 'step' (did you mean 'steps'?)" in res.output
    with pytest.raises(SystemExit) as e:
        module_main([str(f), "loss=nope"])
    assert e.value.code == 2
