# Pooled embeddings -> reduction -> clusters. A checkpoint: the expert jobs follow the actual count.


checkpoint clustering:
    input:
        mapping="results/{run}/embeddings/mapping.json",
        embeddings="results/{run}/embeddings/embeddings.npy",
    output:
        labels="results/{run}/cluster_labels.npy",
        summary="results/{run}/clusters.json",
    log:
        "results/{run}/logs/clustering.log",
    benchmark:
        "results/{run}/benchmarks/clustering.tsv"
    params:
        settings=lambda w: settings_json(w.run, "clustering"),
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=8000,
    shell:
        "python -m workflow_scripts.clustering cluster --embeddings-dir results/{wildcards.run:q}/embeddings"
        " --labels-out {output.labels:q} --summary-out {output.summary:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"


rule cluster_plot:
    input:
        mapping="results/{run}/embeddings/mapping.json",
        labels="results/{run}/cluster_labels.npy",
        summary="results/{run}/clusters.json",
    output:
        report("results/{run}/cluster_plot.png", caption="../config/report_cluster_plot.rst", category="2. Clustering"),
    log:
        "results/{run}/logs/cluster_plot.log",
    benchmark:
        "results/{run}/benchmarks/cluster_plot.tsv"
    params:
        settings=lambda w: settings_json(w.run, "clustering"),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
    shell:
        "python -m workflow_scripts.cluster_plot --embeddings-dir results/{wildcards.run:q}/embeddings"
        " --labels {input.labels:q} --summary {input.summary:q} --out {output:q} --settings {params.settings:q} > {log:q} 2>&1"
