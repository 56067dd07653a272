# One LoRA adapter per cluster, fine-tuned on the utterances routed to it. One job per expert.


rule expert_assignment:
    input:
        expert="results/{run}/data/expert.json",
        val="results/{run}/data/asr_val.json",
        mapping="results/{run}/embeddings/mapping.json",
        labels="results/{run}/cluster_labels.npy",
        gate="results/{run}/gating.safetensors",
        model=lambda w: base_model_input(w.run),
    output:
        "results/{run}/experts/assignment.json",
    log:
        "results/{run}/logs/expert_assignment.log",
    benchmark:
        "results/{run}/benchmarks/expert_assignment.tsv"
    params:
        model=lambda w: base_model_path(w.run),
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
        " python -m workflow_scripts.experts assign --utterances {input.expert:q} --val {input.val:q}"
        " --embeddings-dir results/{wildcards.run:q}/embeddings --labels {input.labels:q}"
        " --gating {input.gate:q} --base-model {params.model:q} --out {output:q}"
        " --threads {threads:q} --num-workers {resources.num_workers:q} --settings {params.settings:q} > {log:q} 2>&1"


rule expert:
    input:
        assignment="results/{run}/experts/assignment.json",
        model=lambda w: base_model_input(w.run),
    output:
        directory("results/{run}/experts/expert_{expert}"),
    log:
        "results/{run}/logs/expert_{expert}.log",
    benchmark:
        "results/{run}/benchmarks/expert_{expert}.tsv"
    params:
        model=lambda w: base_model_path(w.run),
        work_dir="results/{run}/_work/experts/expert_{expert}",
        settings=lambda w: settings_json(w.run, "lora", "experts", "training"),
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=16000,
        gpu=1,
    shell:
        "python -m workflow_scripts.gpu_pool --gpus {resources.gpu:q} --"
        " python -m workflow_scripts.experts train --expert {wildcards.expert:q}"
        " --assignment {input.assignment:q} --base-model {params.model:q} --out {output:q}"
        " --work-dir {params.work_dir:q} --threads {threads:q} --settings {params.settings:q} > {log:q} 2>&1"


rule experts_manifest:
    input:
        expert_dirs,
    output:
        "results/{run}/experts/manifest.json",
    log:
        "results/{run}/logs/experts_manifest.log",
    benchmark:
        "results/{run}/benchmarks/experts_manifest.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
    shell:
        "python -m workflow_scripts.experts manifest --out {output:q} {input:q} > {log:q} 2>&1"
