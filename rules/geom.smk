# GEOM-drugs (voxel denoising): Dataverse rdkit_folder.tar.gz (or MiDi pickles); embedded = RDKit + GFN2-xTB in the rdkit_folder layout


rule build_embedded_geom:
    output:
        directory("resources/geom/embedded"),
    log:
        "logs/geom/build_embedded.log",
    benchmark:
        "benchmarks/geom/build_embedded.tsv"
    priority: DATA_PRIORITY
    conda:
        "../envs/data.yaml"
    threads: 2
    params:
        cfg=embedded_cfg("geom"),
    shell:
        "equipipe build-embedded geom --out {output} --cfg {params.cfg:q} 2> {log}"


rule download_geom:
    output:
        directory("resources/geom/{source}"),
    log:
        "logs/geom/download_{source}.log",
    wildcard_constraints:
        source="geom-rdkit|midi",
    priority: DATA_PRIORITY
    retries: 2
    localrule: True
    conda:
        "../envs/data.yaml"
    params:
        cfg=download_cfg("geom"),
    shell:
        "equipipe download geom --source {wildcards.source} --out {output} --cfg {params.cfg:q} 2> {log}"
