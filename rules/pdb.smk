# PDB C-alpha chains (flow matching): wwPDB metadata + mmCIF structures in ONE job with internal concurrency; embedded = MDAnalysis test chains


rule build_embedded_pdb:
    output:
        directory("resources/pdb/embedded"),
    params:
        cfg=dataset_cfg("pdb", "embedded"),
    log:
        "logs/pdb/build_embedded.log",
    benchmark:
        "benchmarks/pdb/build_embedded.tsv"
    threads: 2
    conda:
        "../envs/data.yaml"
    shell:
        "equipipe build-embedded pdb --out {output} --cfg {params.cfg:q} 2> {log}"


rule download_pdb:
    output:
        directory("resources/pdb/{source}"),
    wildcard_constraints:
        source="wwpdb",
    params:
        cfg=download_cfg("pdb"),
    log:
        "logs/pdb/download_{source}.log",
    localrule: True
    retries: 2
    conda:
        "../envs/data.yaml"
    shell:
        "equipipe download pdb --source {wildcards.source} --out {output} --cfg {params.cfg:q} 2> {log}"
