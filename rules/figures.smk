# One job per configured figure; it reads only the runs and analyses it draws, so adding a run
# reruns only the figures that show it.


rule figure:
    input:
        unpack(figure_inputs),
    output:
        png=report(
            "results/figures/{figure}.png",
            caption="../workflow/report/figure.rst",
            category="Figures",
            labels={"figure": "{figure}"},
        ),
        pdf="results/figures/{figure}.pdf",
        svg="results/figures/{figure}.svg",
    log:
        "logs/figures/{figure}.log",
    localrule: True
    conda:
        "../envs/figures.yaml"
    params:
        spec=figure_spec,
        runs=figure_runs,
        extra=figure_extra,
    shell:
        "equipipe figure --spec {params.spec:q} --runs {params.runs} --extra {params.extra} "
        "--out-prefix results/figures/{wildcards.figure} 2> {log}"
