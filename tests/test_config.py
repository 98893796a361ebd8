import copy
import json
from pathlib import Path

import pytest
import yaml

from equipipe.config import (
    MODEL_SIZES,
    ConfigError,
    check_config,
    load_config,
    run_spec,
    runs,
    validate_schema,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["config.yaml", "paper.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "config" / name)
    assert runs(cfg)
    for e, s in runs(cfg):
        spec = run_spec(cfg, e, s)
        json.dumps(spec)
        assert spec["task_cfg"]["model"] == spec["model"]


def _cfg():
    return validate_schema(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))


def test_unknown_model_size_names_key_and_allowed_values():
    cfg = _cfg()
    cfg["experiments"]["ff_default"]["size"] = "7M"
    with pytest.raises(
        ConfigError, match=r"experiments\.ff_default\.size: '7M'.*allowed: tiny, 1M, 4M, 6M"
    ):
        check_config(cfg)


def test_schema_errors_name_the_key():
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["tasks"]["forcefield"]["train"]["optimizer"] = "lion"
    with pytest.raises(ConfigError, match=r"tasks\.forcefield\.train\.optimizer"):
        validate_schema(cfg)
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["experiments"]["ff_default"]["subset"] = "c999"
    with pytest.raises(ConfigError, match=r"experiments\.ff_default\.subset: 'c999'.*allowed"):
        check_config(validate_schema(cfg))


def test_experiment_overrides_merge_into_task_recipe():
    cfg = _cfg()
    cfg = copy.deepcopy(cfg)
    cfg["experiments"]["ff_default"]["train"] = {"lr": 0.5}
    spec = run_spec(cfg, "ff_default", 1)
    assert (
        spec["train"]["lr"] == 0.5
        and spec["train"]["steps"] == cfg["tasks"]["forcefield"]["train"]["steps"]
    )
    assert spec["seed"] == 1


def test_model_sizes_match_registry():
    from equipipe.models.registry import SIZES

    for name, sizes in SIZES.items():
        assert set(sizes) == set(MODEL_SIZES[name]), name
