# Config validation (first thing) and input functions. Imports nothing heavy: the paper grid
# must plan in under 5 s.
import json
import os

from equipipe import config as eqcfg
from equipipe.data.dataset_block import step_block
from equipipe.params import param_file  # JSON params as short content-addressed files

# The schema (workflow/schemas/config.schema.yaml) with every free-form block closed, defaults
# filled, then the checks between fields; errors name the key's path and the allowed keys.
eqcfg.validate_schema(config)
eqcfg.check_config(config)

RUNS = eqcfg.runs(config)
# Data preparation (build, preprocess, split, subset) goes before any training job, so every
# dataset's jobs are ready from the start and the longest-first order spans all of them.
DATA_PRIORITY = 10**6
DATASETS = sorted(config["datasets"])


wildcard_constraints:
    experiment="|".join(config["experiments"]),
    dataset="|".join(DATASETS),
    seed=r"\d+",


def run_dir(experiment, seed):
    return f"results/runs/{experiment}/seed{seed}"


def run_dirs(experiments):
    # sorted: params must not depend on the order of keys in the config file
    return sorted(run_dir(e, s) for e, s in RUNS if e in experiments)


def raw_dir(dataset):
    return f"resources/{dataset}/{config['datasets'][dataset]['source']}"


def preprocess_input(wildcards):
    return raw_dir(wildcards.dataset)


def dataset_cfg(dataset, block):
    return param_file(
        json.dumps(config["datasets"].get(dataset, {}).get(block, {}), sort_keys=True)
    )


def step_cfg(dataset, step):
    """The validated dataset block a data step receives (equipipe.data.dataset_block)."""
    return param_file(
        json.dumps(
            step_block(config["datasets"].get(dataset, {}), step, dataset),
            sort_keys=True,
        )
    )


def embedded_cfg(dataset):
    return step_cfg(dataset, "build_embedded")


def download_cfg(dataset):
    return step_cfg(dataset, "download")


def preprocess_cfg(wildcards):
    return step_cfg(wildcards.dataset, "preprocess")


def split_cfg(wildcards):
    return dataset_cfg(wildcards.dataset, "split")


def subset_param(wildcards):
    s = config["datasets"][wildcards.dataset]["subsets"][wildcards.subset]
    return {"size": s["size"], "unit": s.get("unit", "fraction")}


def train_inputs(wildcards):
    ds = eqcfg.dataset_of_experiment(config, wildcards.experiment)
    subset = config["experiments"][wildcards.experiment]["subset"]
    return {
        "store": f"results/data/{ds}/store",
        "split": f"results/data/{ds}/split.parquet",
        "subset": f"results/data/{ds}/subsets/{subset}.parquet",
    }


def train_spec(wildcards):
    return param_file(
        eqcfg.run_spec_json(config, wildcards.experiment, int(wildcards.seed))
    )


def train_out(wildcards):
    return run_dir(wildcards.experiment, wildcards.seed)


def train_gpus(wildcards):
    return int(config["experiments"][wildcards.experiment]["resources"]["gpu"])


def train_runtime(wildcards):
    return int(config["experiments"][wildcards.experiment]["resources"]["runtime"])


def train_mem(wildcards):
    return int(config["experiments"][wildcards.experiment]["resources"]["mem_mb"])


def run_files(experiments, names=("metrics.parquet", "run.json")):
    return [f"{d}/{n}" for d in run_dirs(experiments) for n in names]


def analysis_of(wildcards):
    return config["analyses"][wildcards.analysis]


def analysis_runs(a):
    """Run folders an analysis reads: one (landscape, twirling) or the matched set (efficiency)."""
    if a.get("experiments"):
        return run_dirs(a["experiments"])
    return [run_dir(a["experiment"], a["seed"])]


def analysis_inputs(wildcards):
    a = analysis_of(wildcards)
    # md: every checkpoint of the model's runs and the e3nn floor's weights
    if a["kind"] == "md":
        names = ("metrics.parquet", "run.json", "model.pt", "checkpoints")
        return {"runs": run_files(a.get("experiments") or [a["experiment"]], names)}
    if a.get("experiments"):
        return {"runs": run_files(a["experiments"]), **sweep_input(a.get("spec"))}
    d = run_dir(a["experiment"], a["seed"])
    return {"info": f"{d}/run.json", "weights": f"{d}/{a['checkpoint']}"}


def analysis_run(wildcards):
    return " ".join(analysis_runs(analysis_of(wildcards)))


def analysis_kind(wildcards):
    return analysis_of(wildcards)["kind"]


def analysis_spec(wildcards):
    a = analysis_of(wildcards)
    extra = {"experiments": a["experiments"]} if a.get("experiments") else {}
    if a.get("checkpoint"):
        extra["checkpoint"] = a["checkpoint"]
    return param_file(json.dumps({**a["spec"], **extra}, sort_keys=True))


def dip_windows():
    """experiment -> [lo, hi] steps of the dip search, for collect and headlines."""
    return param_file(json.dumps(eqcfg.dip_windows(config), sort_keys=True))


def figure_of(wildcards):
    return config["figures"][wildcards.figure]


def figure_inputs(wildcards):
    f = figure_of(wildcards)
    return {
        "runs": run_files(f["experiments"]),
        "analyses": [f"results/analysis/{a}" for a in f["analyses"]],
        **sweep_input(f.get("style")),
    }


def sweep_input(spec):
    """The efficiency gap's committed tuning-sweep summary (``sweep``), found in the working
    directory or else in the repository (as equipipe.tuning.repo_path finds it)."""
    path = (spec or {}).get("sweep")
    if not path:
        return {}
    if os.path.isabs(path) or os.path.exists(path):
        return {"sweep": path}
    return {"sweep": os.path.join(os.path.dirname(workflow.basedir), path)}


def figure_spec(wildcards):
    return param_file(
        json.dumps({"name": wildcards.figure, **figure_of(wildcards)}, sort_keys=True)
    )


def figure_runs(wildcards):
    return " ".join(run_dirs(figure_of(wildcards)["experiments"]))


def figure_extra(wildcards):
    return " ".join(
        f"{a}=results/analysis/{a}" for a in figure_of(wildcards)["analyses"]
    )


def all_targets():
    figs = [
        f"results/figures/{name}.{ext}"
        for name in config["figures"]
        for ext in ("png", "pdf", "svg")
    ]
    tables = [f"results/tables/{name}.html" for name in config.get("analyses", {})]
    return (
        figs
        + tables
        + [
            "results/metrics_all.parquet",
            "results/paper_comparison.html",
            "results/config_used.yaml",
        ]
    )
