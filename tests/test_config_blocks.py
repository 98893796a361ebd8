"""Every free-form config block is closed: a typo'd key or a wrong type fails planning, naming the
key's full path and the allowed keys; defaults live in the schema only; docs and code agree."""

from __future__ import annotations

import ast
import copy
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from equipipe import config as eqcfg
from equipipe.config import ConfigError, check_config, defaults, run_spec, validate_schema
from tests.test_workflow import snakemake

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
PAPER = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
TINY = yaml.safe_load((ROOT / "tests" / "fixtures" / "tiny_config.yaml").read_text())


def _check(cfg: dict) -> dict:
    return check_config(validate_schema(copy.deepcopy(cfg)))


def _put(cfg: dict, path: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    *parents, last = path.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return cfg


# (config, path of the typo'd key, value, one key the message must list as allowed)
TYPOS = [
    (DEFAULT, "datasets.spice.download.zenodo_apii", "http://x", "zenodo_api"),
    (DEFAULT, "datasets.pdb.download.mirorr", "/data/pdb", "mirror"),
    (PAPER, "datasets.geom.download.allow_unverified_pickle", True, "allow_unverified_pickles"),
    (DEFAULT, "datasets.spice.embedded.n_molecule", 10, "n_molecules"),
    (DEFAULT, "datasets.geom.embedded.temprature", 300.0, "temperature"),
    (DEFAULT, "datasets.spice.preprocess.max_bad_fracton", 0.9, "max_bad_fraction"),
    (DEFAULT, "datasets.pdb.preprocess.max_lenght", 300, "max_length"),
    (DEFAULT, "datasets.geom.preprocess.grid_sise", 64, "grid_size"),
    (PAPER, "datasets.spice.split.predefined.colum", "source", "column"),
    (DEFAULT, "datasets.spice.split.fractions.vall", 0.1, "val"),
    (DEFAULT, "tasks.forcefield.task_cfg.energy_weigth", 1.0, "energy_weight"),
    (DEFAULT, "tasks.flowmatching.task_cfg.self_conditioning", 0.5, "self_cond_prob"),
    (DEFAULT, "tasks.denoising.task_cfg.noise_sigm", 0.5, "noise_sigma"),
    (DEFAULT, "experiments.ff_default.task_cfg.force_weigth", 1.0, "force_weight"),
    (DEFAULT, "tasks.forcefield.task_cfg.model_overrides.hiden", 64, "hidden"),
    (DEFAULT, "experiments.dn_default.task_cfg.model_overrides.bse", 8, "base"),
    (DEFAULT, "experiments.ff_default.resources.gpus", 1, "gpu"),
    (DEFAULT, "analyses.ff_landscape.spec.gridd", 5, "grid"),
    (DEFAULT, "analyses.ff_twirling.spec.k_s", [1, 2], "ks"),
    (DEFAULT, "analyses.ff_efficiency.spec.basline", "ff_aug", "baseline"),
    (DEFAULT, "figures.ff_pct_linear.style.xscal", "log", "xscale"),
    (DEFAULT, "figures.ff_landscape.style.elevation", 10, "elev"),
    (DEFAULT, "datasets.qm9", {"source": "embedded", "subsets": {"a": {"size": 1}}}, "spice"),
]


@pytest.mark.parametrize("cfg, path, value, allowed", TYPOS, ids=[t[1] for t in TYPOS])
def test_typo_in_each_free_form_block_names_path_and_allowed_keys(cfg, path, value, allowed):
    if path.startswith("datasets.pdb") and "pdb" not in cfg["datasets"]:
        pytest.fail("the config lacks the block under test")
    with pytest.raises(ConfigError) as err:
        _check(_put(cfg, path, value))
    msg = str(err.value)
    assert path in msg and "allowed keys:" in msg, msg
    assert re.search(rf"allowed keys:.*\b{allowed}\b", msg), msg


WRONG_TYPES = [
    ("datasets.spice.preprocess.max_bad_fraction", "0.1", "is not of type 'number'"),
    ("datasets.spice.preprocess.max_bad_fraction", 1.5, "maximum"),
    ("datasets.pdb.preprocess.backend", "pdbx", "allowed: gemmi, biopython"),
    ("experiments.ff_default.resources.gpu", "1", "is not of type 'integer'"),
    ("tasks.forcefield.task_cfg.energy_reference", "quadratic", "allowed: linear, none"),
    ("tasks.flowmatching.task_cfg.self_cond_prob", "1e-3", "write 1.0e-3"),
    ("experiments.fm_default.task_cfg.model_overrides.qk_norm", "yes", "'boolean'"),
    ("analyses.ff_landscape.spec.grid", 2.5, "'integer'"),
    ("figures.ff_pct_linear.style.xscale", "logarithmic", "allowed: linear, log"),
]


@pytest.mark.parametrize("path, value, text", WRONG_TYPES, ids=[w[0] for w in WRONG_TYPES])
def test_wrong_type_names_path(path, value, text):
    with pytest.raises(ConfigError) as err:
        _check(_put(DEFAULT, path, value))
    assert path in str(err.value) and text in str(err.value), str(err.value)


def test_download_expected_pins_are_closed_per_file():
    cfg = copy.deepcopy(PAPER)
    cfg["datasets"]["spice"]["download"] = {"expected": {"test_large_neut_all.xyz": {"frame": 5}}}
    with pytest.raises(ConfigError) as err:
        _check(cfg)
    msg = str(err.value)
    assert "datasets.spice.download.expected.test_large_neut_all.xyz.frame" in msg
    assert "allowed keys: size, md5, sha256, frames" in msg
    cfg["datasets"]["spice"]["download"] = {"expected": {"x.xyz": {"md5": "not-hex"}}}
    with pytest.raises(
        ConfigError, match=r"download\.expected\.x\.xyz\.md5: 'not-hex' does not match"
    ):
        _check(cfg)


def test_model_overrides_checked_on_the_merged_slice_when_an_experiment_switches_model():
    cfg = _put(DEFAULT, "tasks.forcefield.task_cfg.model_overrides", {"n_rbf": 64})
    # ff_equivariant switches to the e3nn model, which has no n_rbf: the merged slice is wrong
    assert cfg["experiments"]["ff_equivariant"]["model"] == "equivariant"
    with pytest.raises(ConfigError) as err:
        _check(cfg)
    msg = str(err.value)
    assert "tasks.forcefield.task_cfg.model_overrides.n_rbf" in msg
    assert "'ff_equivariant'" in msg and "model 'equivariant'" in msg and "n_radial" in msg
    # the same key on the experiment that keeps the EScAIP model is fine
    ok = _put(DEFAULT, "experiments.ff_default.task_cfg", {"model_overrides": {"n_rbf": 64}})
    assert run_spec(_check(ok), "ff_default", 0)["task_cfg"]["model_overrides"] == {"n_rbf": 64}


def test_task_cfg_model_is_not_a_config_key():
    with pytest.raises(ConfigError, match=r"tasks\.forcefield\.task_cfg\.model .*experiments"):
        _check(_put(DEFAULT, "tasks.forcefield.task_cfg.model", "equivariant"))


def test_source_specific_keys_are_refused_for_other_sources():
    cfg = _put(DEFAULT, "datasets.geom.download.midi_sha256", {"train": "ab" * 32})
    with pytest.raises(ConfigError, match=r"datasets\.geom\.download\.midi_sha256: applies only"):
        _check(cfg)
    cfg = _put(PAPER, "datasets.spice.download.zenodo_api", "http://127.0.0.1:1/api")
    with pytest.raises(ConfigError, match=r"zenodo_api: applies only to source spice-2\.0\.1"):
        _check(cfg)
    _check(_put(PAPER, "datasets.spice.download.apollo_base", "http://127.0.0.1:1/b"))


def test_defaults_filled_from_the_schema_and_read_by_the_modules():
    cfg = _check(DEFAULT)
    assert cfg["datasets"]["spice"]["preprocess"]["max_bad_fraction"] == 0.05
    assert cfg["datasets"]["spice"]["preprocess"]["max_gradient"] == 1.0
    # the embedded config sets only runtime (the scheduling priority): the rest is the default
    assert cfg["experiments"]["ff_default"]["resources"] == {
        **defaults("resources", "train"),
        "runtime": 10,
    }
    assert cfg["analyses"]["ff_twirling"]["checkpoint"] == "model.pt"
    from equipipe.analyses import LANDSCAPE_DEFAULTS
    from equipipe.data import geom, pdb, spice
    from equipipe.efficiency import DEFAULTS as EFF
    from equipipe.tasks.denoising import DEFAULTS as DN
    from equipipe.tasks.flowmatching import FlowMatchingTask

    for mod, name in ((spice, "spice"), (pdb, "pdb"), (geom, "geom")):
        for kind in ("download", "embedded", "preprocess"):
            for k, v in defaults(kind, name).items():
                assert mod.DEFAULTS[k] == v, (name, kind, k)
    assert (
        FlowMatchingTask({}).cfg["self_cond_prob"]
        == defaults("task_cfg", "flowmatching")["self_cond_prob"]
    )
    assert LANDSCAPE_DEFAULTS == defaults("analysis", "landscape")
    assert EFF == defaults("analysis", "efficiency")
    assert DN["grid_size"] == defaults("preprocess", "geom")["grid_size"]


def test_resources_reach_the_scheduler(tmp_path):
    cfg = _put(TINY, "experiments.ff_c4.resources", {"gpu": 1, "runtime": 7, "mem_mb": 1234})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = snakemake(tmp_path, "-n", "--printshellcmds", "results/runs/ff_c4/seed0/run.json")
    text = out.stdout + out.stderr
    assert re.search(r"gpu=1\b", text) and "runtime=7" in text and "mem_mb=1234" in text, text


@pytest.mark.parametrize(
    "path, value, fragment",
    [
        (
            "datasets.spice.preprocess.max_bad_fracton",
            0.9,
            "datasets.spice.preprocess.max_bad_fracton",
        ),
        ("experiments.ff_c4.resources.gpus", 1, "experiments.ff_c4.resources.gpus"),
    ],
)
def test_snakemake_dry_run_refuses_a_typo(tmp_path, path, value, fragment):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(_put(TINY, path, value)))
    out = snakemake(tmp_path, "-n", check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and fragment in text and "allowed keys:" in text, text[-3000:]


# --------------------------------------------------------------------------- cross-field checks


def test_split_name_that_does_not_exist():
    # paper.yaml's SPICE split makes train and val only (MACE-OFF23's own split)
    with pytest.raises(ConfigError, match=r"tasks\.forcefield\.eval\.split: 'test' is not a split"):
        _check(_put(PAPER, "tasks.forcefield.eval.split", "test"))
    with pytest.raises(ConfigError, match=r"analyses\.escaip_landscape\.spec\.split: 'test'"):
        _check(_put(PAPER, "analyses.escaip_landscape.spec.split", "test"))
    cfg = _put(DEFAULT, "datasets.spice.split.fractions", {"train": 0.9, "val": 0.1, "test": 0.0})
    with pytest.raises(
        ConfigError, match=r"experiments\.ff_default\.eval\.split: 'test'.*allowed: train, val"
    ):
        _check(_put(cfg, "experiments.ff_default.eval", {"split": "test"}))


def test_figure_split_that_the_experiments_never_log():
    with pytest.raises(
        ConfigError,
        match=r"figures\.dn_pct_by_data\.style\.split: 'val_haarr'.*allowed: train, val, val_haar, val_octahedral",
    ):
        _check(_put(DEFAULT, "figures.dn_pct_by_data.style.split", "val_haarr"))
    with pytest.raises(
        ConfigError, match=r"figures\.ff_pct_linear\.style\.split: 'test'.*allowed: train, val$"
    ):
        _check(_put(DEFAULT, "figures.ff_pct_linear.style.split", ["val", "test"]))


def test_efficiency_analysis_names_its_own_experiments_and_a_logged_split():
    with pytest.raises(
        ConfigError, match=r"analyses\.ff_efficiency\.spec\.baseline: 'ff_default' is not one of"
    ):
        _check(_put(DEFAULT, "analyses.ff_efficiency.spec.baseline", "ff_default"))
    with pytest.raises(ConfigError, match=r"analyses\.ff_efficiency\.spec\.split: 'test'"):
        _check(_put(DEFAULT, "analyses.ff_efficiency.spec.split", "test"))
    with pytest.raises(ConfigError, match=r"style\.equivariant: 'ff_equivarant' is not one of"):
        _check(_put(DEFAULT, "figures.ff_efficiency_gap.style.equivariant", "ff_equivarant"))


def test_subset_fraction_above_one():
    with pytest.raises(
        ConfigError, match=r"datasets\.spice\.subsets\.all\.size: 1\.5 is a fraction above 1"
    ):
        _check(_put(DEFAULT, "datasets.spice.subsets.all", {"size": 1.5, "unit": "fraction"}))
    with pytest.raises(
        ConfigError, match=r"subsets\.c200\.size: a count of conformers must be a whole"
    ):
        _check(_put(DEFAULT, "datasets.spice.subsets.c200", {"size": 20.5, "unit": "conformers"}))


def test_spectrum_needs_three_rotations_at_plan_time():
    """Found by the paper grid in miniature: k = 2 with the spectrum on failed only in training."""
    cfg = _put(DEFAULT, "tasks.forcefield.eval.spectrum_every", 1)
    with pytest.raises(ConfigError, match=r"experiments\.\w+\.eval: spectrum_every needs k >= 3"):
        _check(_put(cfg, "tasks.forcefield.eval.k", 2))
    _check(_put(cfg, "tasks.forcefield.eval.k", 3))


def test_grad_ratio_figure_needs_the_gradient_norm_ratio_at_plan_time():
    """A grad_ratio figure of an experiment that does not compute the ratio would be empty."""
    cfg = _put(DEFAULT, "experiments.fm_default.eval.grad_norm_batches", 0)
    with pytest.raises(
        ConfigError,
        match=r"figures\.fm_grad_ratio: grad_ratio draws experiment 'fm_default'.*grad_norm_batches: 0",
    ):
        _check(cfg)
    _check(DEFAULT)
    # the task default (0 for flow matching) is what an experiment without its own override gets
    with pytest.raises(ConfigError, match=r"grad_ratio draws experiment 'fm_c12'"):
        _check(_put(DEFAULT, "figures.fm_grad_ratio.experiments", ["fm_default", "fm_c12"]))


def test_unknown_figure_kind():
    with pytest.raises(
        ConfigError, match=r"figures\.ff_pct_linear\.kind: 'pct_vs_time'.*allowed: pct_vs_step"
    ):
        _check(_put(DEFAULT, "figures.ff_pct_linear.kind", "pct_vs_time"))


def test_denoising_grid_lives_in_the_geom_preprocess_block():
    cfg = _check(PAPER)
    for exp in ("voxmol_111M_100", "voxmol_7M"):
        tc = run_spec(cfg, exp, 0)["task_cfg"]
        assert (tc["grid_size"], tc["grid_spacing"]) == (64, 0.25)
    cfg = _put(DEFAULT, "datasets.geom.preprocess.grid_size", 16)
    assert run_spec(_check(cfg), "dn_default", 0)["task_cfg"]["grid_size"] == 16
    with pytest.raises(ConfigError) as err:
        _check(_put(DEFAULT, "tasks.denoising.task_cfg.grid_size", 64))
    msg = str(err.value)
    assert (
        "tasks.denoising.task_cfg.grid_size: 64 differs from datasets.geom.preprocess.grid_size = 24"
        in msg
    )
    _check(_put(DEFAULT, "tasks.denoising.task_cfg.grid_spacing", 0.75))  # equal: accepted


# --------------------------------------------------------------------------- code and docs agree


def test_schema_figure_kinds_and_style_keys_match_the_code():
    """The style keys each kind reads (ctx.opt / ctx.style[...] in it and the helpers it calls,
    found in the source of the figures package) are exactly the schema's list for that kind."""
    from equipipe import figures

    assert set(eqcfg.figure_kinds()) == set(figures.KINDS)
    read: dict[str, set[str]] = {}
    funcs: dict[str, tuple] = {}  # "name@module" -> (node, source, module)
    for path in sorted((ROOT / "equipipe" / "figures").glob("*.py")):
        src = path.read_text()
        for n in ast.walk(ast.parse(src)):
            if isinstance(n, ast.FunctionDef):
                funcs[f"{n.name}@{path.stem}"] = (n, src, path.stem)
    pat = r"""(?:opt|style\.get)\(\s*["'](\w+)["']|style\[["'](\w+)["']\]"""

    def callees(name: str, mod: str) -> list[str]:
        """The function a call names: in the caller's module, else wherever the package has it."""
        if f"{name}@{mod}" in funcs:
            return [f"{name}@{mod}"]
        return [k for k in funcs if k.split("@")[0] == name]

    def closure(n, src, mod, seen):
        keys = {a or b for a, b in re.findall(pat, ast.get_source_segment(src, n))}
        for c in ast.walk(n):
            if isinstance(c, ast.Call):
                f = c.func
                name = f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)
                for k in callees(name, mod):
                    if k not in seen:
                        seen.add(k)
                        keys |= closure(*funcs[k], seen)
        return keys

    for n, src, mod in funcs.values():
        for d in n.decorator_list:
            if isinstance(d, ast.Call) and getattr(d.func, "id", "") == "register_kind":
                read[d.args[0].value] = closure(n, src, mod, set())
    assert set(read) == set(figures.KINDS)  # every kind's source was read
    read["efficiency_gap"] |= set(defaults("analysis", "efficiency")) - {"experiments"}
    for kind, keys in read.items():
        assert set(eqcfg.allowed_keys("figure_style", kind)) == keys, kind


def test_model_overrides_are_the_model_config_fields():
    from equipipe.models import equivariant, escaip, nequip_adapter, proteina, voxmol
    from equipipe.models.registry import SIZES

    classes = {
        "escaip": escaip.EScAIPConfig,
        "equivariant": equivariant.EquivariantConfig,
        "proteina": proteina.ProteinaConfig,
        "voxmol": voxmol.VoxMolConfig,
    }
    assert set(classes) | {"nequip"} == set(SIZES) == set(eqcfg.block_names("model_overrides"))
    for name, cls in classes.items():
        fields = [f.name for f in dataclasses.fields(cls)]
        assert eqcfg.allowed_keys("model_overrides", name) == fields, name
    # nequip: its config fields less the training statistics (those come from the task's fit)
    fields = [f.name for f in dataclasses.fields(nequip_adapter.NequIPConfig)]
    fields = [f for f in fields if f not in nequip_adapter.STAT_FIELDS]
    assert eqcfg.allowed_keys("model_overrides", "nequip") == fields


def test_train_and_eval_keys_are_the_training_loop_fields():
    from equipipe.train import EvalConfig, TrainConfig

    s = eqcfg.schema()["$defs"]
    assert set(s["train"]["properties"]) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(s["eval"]["properties"]) == {f.name for f in dataclasses.fields(EvalConfig)}
    assert EvalConfig().split == eqcfg.EVAL_SPLIT_DEFAULT


def test_readme_documents_exactly_the_schema_keys():
    from equipipe.config_docs import render_readme

    committed = (ROOT / "config" / "README.md").read_text()
    assert committed == render_readme(committed), (
        "config/README.md is out of date with the schema: run `equipipe config-docs --write`"
    )


def test_schema_property_definitions_use_known_keywords_only():
    """A comma in an unquoted flow-style description silently adds a bogus keyword (YAML)."""
    vocab = {
        "type", "default", "description", "enum", "items", "minimum", "maximum",
        "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems", "additionalProperties",
        "properties", "required", "$ref", "x-sources", "x-internal", "minProperties", "pattern",
    }  # fmt: skip
    bad = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in (node.get("properties") or {}).items():
                if isinstance(v, dict) and set(v) - vocab:
                    bad.append((f"{path}.{k}", set(v) - vocab))
            for k, v in node.items():
                walk(v, f"{path}.{k}")

    walk(eqcfg.schema(), "")
    assert not bad, bad


@pytest.mark.parametrize("cfg", [DEFAULT, PAPER, TINY], ids=["config", "paper", "tiny"])
def test_shipped_configs_use_only_keys_the_code_reads(cfg):
    out = _check(cfg)
    for exp, seed in eqcfg.runs(out):
        spec = run_spec(out, exp, seed)
        kind, model = spec["task"], spec["model"]
        assert set(spec["task_cfg"]) <= set(eqcfg.block_schema("task_cfg", kind)["properties"])
        assert set(spec["task_cfg"]["model_overrides"]) <= set(
            eqcfg.allowed_keys("model_overrides", model)
        )


def test_planning_imports_nothing_heavy():
    """What rules/common.smk imports (the config module, the dataset block wiring) and a full
    validation of the paper grid load no torch, e3nn, rdkit or matplotlib."""
    import subprocess
    import sys

    code = (
        "import sys, yaml\n"
        "from equipipe import config as c\n"
        "import equipipe.data.dataset_block\n"
        "c.check_config(c.validate_schema(yaml.safe_load(open('config/paper.yaml'))))\n"
        "heavy = [m for m in ('torch', 'e3nn', 'rdkit', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
