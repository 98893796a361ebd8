# PDB C-alpha chains (flow matching): wwPDB metadata + mmCIF structures in ONE job with internal concurrency; embedded = MDAnalysis test chains


rule build_embedded_pdb:
    output:
        directory("resources/pdb/embedded"),
    log:
        "logs/pdb/build_embedded.log",
    benchmark:
        "benchmarks/pdb/build_embedded.tsv"
    priority: DATA_PRIORITY
    conda:
        "../envs/data.yaml"
    threads: 2
    params:
        cfg=embedded_cfg("pdb"),
    shell:
        "equipipe build-embedded pdb --out {output} --cfg {params.cfg:q} 2> {log}"


rule download_pdb:
    output:
        directory("resources/pdb/{source}"),
    log:
        "logs/pdb/download_{source}.log",
    wildcard_constraints:
        source="remote",
    priority: DATA_PRIORITY
    retries: 2
    localrule: True
    conda:
        "../envs/data.yaml"
    params:
        cfg=download_cfg("pdb"),
    shell:
        "equipipe download pdb --source {wildcards.source} --out {output} --cfg {params.cfg:q} 2> {log}"
