# The report itself is written by `snakemake --report results/report.zip` (see the Makefile):
# every figure (png) and the measured-vs-study table are report items with captions.
# This rule archives the configuration used, so the report states what produced it.


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
