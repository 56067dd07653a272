# A small MLP learns embedding -> cluster; it routes utterances that were never clustered.


rule gating:
    input:
        mapping="results/{run}/embeddings/mapping.json",
        labels="results/{run}/cluster_labels.npy",
    output:
        gate="results/{run}/gating.safetensors",
        metrics="results/{run}/gating_metrics.json",
    log:
        "results/{run}/logs/gating.log",
    benchmark:
        "results/{run}/benchmarks/gating.tsv"
    params:
        settings=lambda w: settings_json(w.run, "gating"),
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=4000,
    shell:
        "python -m workflow_scripts.gating train --embeddings-dir results/{wildcards.run:q}/embeddings"
        " --labels {input.labels:q} --out {output.gate:q} --metrics-out {output.metrics:q}"
        " --threads {threads:q} --settings {params.settings:q} > {log:q} 2>&1"


rule gating_plot:
    input:
        "results/{run}/gating_metrics.json",
    output:
        report("results/{run}/gating_metrics.png", caption="../config/report_gating_plot.rst", category="3. Gating"),
    log:
        "results/{run}/logs/gating_plot.log",
    benchmark:
        "results/{run}/benchmarks/gating_plot.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "python -m workflow_scripts.gating plot --metrics {input:q} --out {output:q} > {log:q} 2>&1"
