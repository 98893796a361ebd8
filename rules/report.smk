# The report itself is written by `snakemake --report results/report.zip` (see the Makefile):
# every figure (png) and the measured-vs-study table are report items with captions.
# This rule archives the configuration used, so the report states what produced it.


import os


rule archive_config:
    output:
        report(
            "results/config_used.yaml",
            caption="../workflow/report/config.rst",
            category="Configuration",
        ),
    log:
        "logs/archive_config.log",
    localrule: True
    conda:
        "../envs/figures.yaml"
    params:
        cfg=param_file(json.dumps(config, sort_keys=True)),
    script:
        "../scripts/archive_config.py"


# Provenance of the report: code (git commit, dirty), environment (lock hash, versions), machine,
# every run's seed and device, and per dataset the source, raw files (sizes, sha256) and the
# quarantine counts. The lock and the code are read from the workflow's repository (the
# lock's folder's parent).
REPO = os.path.abspath(os.path.join(workflow.basedir, ".."))
USED_DATASETS = sorted(
    {eqcfg.dataset_of_experiment(config, e) for e in config["experiments"]}
)


PROVENANCE_DATASETS = json.dumps(
    {
        d: {
            "source": config["datasets"][d]["source"],
            "store": f"results/data/{d}/store",
            "raw": raw_dir(d),
        }
        for d in USED_DATASETS
    },
    sort_keys=True,
)


rule provenance:
    input:
        runs=run_files(config["experiments"], names=("run.json",)),
        stores=[f"results/data/{d}/store" for d in USED_DATASETS],
        raw=[raw_dir(d) for d in USED_DATASETS],
        lock=os.path.join(REPO, "lock", "requirements.txt"),
    output:
        json="results/provenance.json",
        html=report(
            "results/provenance.html",
            caption="../workflow/report/provenance.rst",
            category="Provenance",
        ),
    log:
        "logs/provenance.log",
    localrule: True
    conda:
        "../envs/figures.yaml"
    params:
        runs=" ".join(run_dirs(config["experiments"])),
        datasets=PROVENANCE_DATASETS,
    shell:
        "equipipe provenance --runs {params.runs} --datasets {params.datasets:q} "
        "--lock {input.lock} --out {output.json} --html {output.html} 2> {log}"


# Headline numbers (dip, final pct, final error) with standard errors, per run and experiment:
# what `equipipe diff-reports` compares (a report item, so the report zip carries it).
rule headlines:
    input:
        run_files(config["experiments"]),
    output:
        report(
            "results/headlines.csv",
            caption="../workflow/report/headlines.rst",
            category="Measured vs study",
        ),
    log:
        "logs/headlines.log",
    localrule: True
    conda:
        "../envs/figures.yaml"
    params:
        runs=" ".join(run_dirs(config["experiments"])),
        windows=dip_windows(),
    shell:
        "equipipe headlines --runs {params.runs} --out {output} "
        "--dip-windows {params.windows:q} 2> {log}"
