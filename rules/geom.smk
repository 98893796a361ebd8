# GEOM-drugs (voxel denoising): Dataverse rdkit_folder.tar.gz (or MiDi pickles); embedded = RDKit + GFN2-xTB in the rdkit_folder layout


rule build_embedded_geom:
    output:
        directory("resources/geom/embedded"),
    params:
        cfg=dataset_cfg("geom", "embedded"),
    log:
        "logs/geom/build_embedded.log",
    benchmark:
        "benchmarks/geom/build_embedded.tsv"
    threads: 2
    conda:
        "../envs/data.yaml"
    shell:
        "equipipe build-embedded geom --out {output} --cfg {params.cfg:q} 2> {log}"


rule download_geom:
    output:
        directory("resources/geom/{source}"),
    wildcard_constraints:
        source="geom-rdkit|midi",
    params:
        cfg=download_cfg("geom"),
    log:
        "logs/geom/download_{source}.log",
    localrule: True
    retries: 2
    conda:
        "../envs/data.yaml"
    shell:
        "equipipe download geom --source {wildcards.source} --out {output} --cfg {params.cfg:q} 2> {log}"
