# SPICE (force field): Zenodo HDF5 releases or the MACE-OFF23 extended-XYZ split; embedded = RDKit + GFN2-xTB


rule build_embedded_spice:
    output:
        directory("resources/spice/embedded"),
    log:
        "logs/spice/build_embedded.log",
    benchmark:
        "benchmarks/spice/build_embedded.tsv"
    priority: DATA_PRIORITY
    conda:
        "../envs/data.yaml"
    threads: 2
    params:
        cfg=embedded_cfg("spice"),
    shell:
        "equipipe build-embedded spice --out {output} --cfg {params.cfg:q} 2> {log}"


rule download_spice:
    output:
        directory("resources/spice/{source}"),
    log:
        "logs/spice/download_{source}.log",
    wildcard_constraints:
        source="spice-2.0.1|spice-1.1.4|maceoff23",
    priority: DATA_PRIORITY
    retries: 2
    localrule: True
    conda:
        "../envs/data.yaml"
    params:
        cfg=download_cfg("spice"),
    shell:
        "equipipe download spice --source {wildcards.source} --out {output} --cfg {params.cfg:q} 2> {log}"
