# One training job per (experiment, seed). Checkpoints live in the UNDECLARED work/ folder of
# the run, so a rerun (--rerun-incomplete, or after SIGKILL/SIGTERM) resumes instead of restarting.


rule train:
    input:
        unpack(train_inputs),
    output:
        metrics="results/runs/{experiment}/seed{seed}/metrics.parquet",
        info="results/runs/{experiment}/seed{seed}/run.json",
        model="results/runs/{experiment}/seed{seed}/model.pt",
        early="results/runs/{experiment}/seed{seed}/early.pt",
        # named weights at train.keep_steps (checkpoints/step<N>.pt; empty folder if none)
        checkpoints=directory("results/runs/{experiment}/seed{seed}/checkpoints"),
    log:
        "logs/train/{experiment}/seed{seed}.log",
    benchmark:
        "benchmarks/train/{experiment}/seed{seed}.tsv"
    # longest first (resources.runtime): short jobs fill the cores at the end
    priority: train_runtime
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        gpu=train_gpus,
        runtime=train_runtime,
        mem_mb=train_mem,
    params:
        spec=train_spec,
        out=train_out,
    shell:
        "equipipe train --spec {params.spec:q} --store {input.store} --split {input.split} "
        "--subset {input.subset} --out {params.out} --gpus {resources.gpu} 2>> {log}"


rule collect:
    input:
        run_files(config["experiments"]),
    output:
        metrics="results/metrics_all.parquet",
        comparison="results/paper_comparison.parquet",
        table=report(
            "results/paper_comparison.html",
            caption="../workflow/report/comparison.rst",
            category="Measured vs study",
        ),
    log:
        "logs/collect.log",
    localrule: True
    conda:
        "../envs/train.yaml"
    params:
        runs=" ".join(run_dirs(config["experiments"])),
        windows=dip_windows(),
    shell:
        "equipipe collect --runs {params.runs} --out-metrics {output.metrics} "
        "--out-comparison {output.comparison} --dip-windows {params.windows:q} 2> {log}"
