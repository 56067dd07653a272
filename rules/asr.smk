# Joint mixture-of-LoRA-experts training: the gate routes each utterance to one expert.


rule asr:
    input:
        unpack(pretraining_inputs),
        train="results/{run}/data/asr_train.json",
        val="results/{run}/data/asr_val.json",
        model=lambda w: base_model_input(w.run),
    output:
        directory("results/{run}/asr_best"),
    log:
        "results/{run}/logs/asr.log",
    benchmark:
        "results/{run}/benchmarks/asr.tsv"
    params:
        model=lambda w: base_model_path(w.run),
        pretrained=pretrained_flags,
        # Resume checkpoints live outside the declared output, which Snakemake deletes on rerun.
        work_dir="results/{run}/_work/asr",
        settings=lambda w: settings_json(w.run, "lora", "asr", "training", "embeddings"),
        launcher=lambda w: asr_launcher(w.run),
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=24000,
        gpu=lambda w: training_gpus(w.run),
    shell:
        "python -m workflow_scripts.gpu_pool --gpus {resources.gpu:q} --"
        " {params.launcher:q} workflow_scripts.asr --train {input.train:q} --val {input.val:q}"
        " --base-model {params.model:q} {params.pretrained:q} --out {output:q}"
        " --work-dir {params.work_dir:q} --threads {threads:q} --settings {params.settings:q} > {log:q} 2>&1"


rule training_curves:
    input:
        asr="results/{run}/asr_best",
        experts=lambda w: [] if skip_pretraining(w.run) else expert_dirs(w),
    output:
        report("results/{run}/training_curves.png", caption="../config/report_training_curves.rst",
               category="4. Training"),
    log:
        "results/{run}/logs/training_curves.log",
    benchmark:
        "results/{run}/benchmarks/training_curves.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "python -m workflow_scripts.curves --out {output:q} {input.asr:q} {input.experts:q} > {log:q} 2>&1"
