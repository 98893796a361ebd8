# Mechanism analyses of one finished run: loss landscapes / Hessian conditioning, test-time twirling.


rule analyse:
    input:
        unpack(analysis_inputs),
    output:
        directory("results/analysis/{analysis}"),
    log:
        "logs/analysis/{analysis}.log",
    benchmark:
        "benchmarks/analysis/{analysis}.tsv"
    priority: 1  # after training jobs, before the (short) figures
    conda:
        "../envs/train.yaml"
    threads: 1
    params:
        kind=analysis_kind,
        run=analysis_run,
        spec=analysis_spec,
    shell:
        "equipipe analyse {params.kind} --run {params.run} --out {output} --spec {params.spec:q} 2> {log}"


rule analysis_table:
    input:
        "results/analysis/{analysis}",
    output:
        report(
            "results/tables/{analysis}.html",
            caption="../workflow/report/analysis_table.rst",
            category="Analyses",
            labels={"analysis": "{analysis}"},
        ),
    log:
        "logs/analysis/{analysis}_table.log",
    conda:
        "../envs/figures.yaml"
    shell:
        "equipipe table {input} --out {output} --title {wildcards.analysis} 2> {log}"
