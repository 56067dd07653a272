# Pooled Whisper encoder embeddings of the (stratified) embedding sample.


rule embeddings:
    input:
        utterances="results/{run}/data/embedding.json",
        model=lambda w: base_model_input(w.run),
    output:
        mapping="results/{run}/embeddings/mapping.json",
        embeddings="results/{run}/embeddings/embeddings.npy",
    log:
        "results/{run}/logs/embeddings.log",
    benchmark:
        "results/{run}/benchmarks/embeddings.tsv"
    params:
        model=lambda w: base_model_path(w.run),
        # Partial results survive a crash here: Snakemake removes declared outputs before a rerun.
        work_dir="results/{run}/_work/embeddings",
        settings=lambda w: settings_json(w.run, "embeddings"),
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=8000,
        gpu=1,
        num_workers=lambda w: loader_workers(w.run),
    shell:
        "python -m workflow_scripts.gpu_pool --gpus {resources.gpu:q} --"
        " python -m workflow_scripts.embeddings --utterances {input.utterances:q}"
        " --base-model {params.model:q} --out-dir results/{wildcards.run:q}/embeddings"
        " --work-dir {params.work_dir:q} --threads {threads:q} --num-workers {resources.num_workers:q} --settings {params.settings:q} > {log:q} 2>&1"
