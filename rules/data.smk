# Dataset-independent steps: raw files -> store -> split -> nested subsets (id lists).


rule preprocess:
    input:
        preprocess_input,
    output:
        directory("results/data/{dataset}/store"),
    log:
        "logs/{dataset}/preprocess.log",
    benchmark:
        "benchmarks/{dataset}/preprocess.tsv"
    priority: DATA_PRIORITY
    conda:
        "../envs/data.yaml"
    params:
        cfg=preprocess_cfg,
    shell:
        "equipipe preprocess {wildcards.dataset} --raw {input} --out {output} --cfg {params.cfg:q} 2> {log}"


rule split:
    input:
        "results/data/{dataset}/store",
    output:
        "results/data/{dataset}/split.parquet",
    log:
        "logs/{dataset}/split.log",
    priority: DATA_PRIORITY
    conda:
        "../envs/data.yaml"
    params:
        cfg=split_cfg,
    shell:
        "equipipe split --store {input} --out {output} --cfg {params.cfg:q} 2> {log}"


rule subset:
    input:
        "results/data/{dataset}/split.parquet",
    output:
        "results/data/{dataset}/subsets/{subset}.parquet",
    log:
        "logs/{dataset}/subset_{subset}.log",
    priority: DATA_PRIORITY
    conda:
        "../envs/data.yaml"
    params:
        s=subset_param,
    shell:
        "equipipe subset --split {input} --size {params.s[size]} --unit {params.s[unit]} --out {output} 2> {log}"
