# Matched controls for the mixture on the run's own samples: `snakemake results/<run>/compare/report.md`.
# Every variant is its own job (gpu resource), so the variants train in parallel on a multi-GPU node
# or a cluster. workflow_scripts/compare.py says what each variant is.


rule compare_train:
    input:
        unpack(compare_train_inputs),
        train="results/{run}/data/asr_train.json",
        val="results/{run}/data/asr_val.json",
        model=lambda w: base_model_input(w.run),
    output:
        directory("results/{run}/compare/{variant}/model"),
    log:
        "results/{run}/logs/compare_train_{variant}.log",
    benchmark:
        "results/{run}/benchmarks/compare_train_{variant}.tsv"
    params:
        model=lambda w: base_model_path(w.run),
        flags=compare_train_flags,
        work_dir="results/{run}/_work/compare/{variant}",
        settings=lambda w: settings_json(w.run, "lora", "asr", "training", "embeddings"),
    wildcard_constraints:
        variant="|".join(COMPARE_TRAINED),
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=24000,
        gpu=1,
    shell:
        "python -m workflow_scripts.gpu_pool --gpus {resources.gpu:q} --"
        " python -m workflow_scripts.compare train --variant {wildcards.variant:q} --train {input.train:q}"
        " --val {input.val:q} --base-model {params.model:q} {params.flags:q} --out {output:q}"
        " --work-dir {params.work_dir:q} --threads {threads:q} --settings {params.settings:q} > {log:q} 2>&1"


rule compare_eval:
    input:
        unpack(compare_eval_inputs),
        utterances="results/{run}/data/eval.json",
        base=lambda w: base_model_input(w.run),
    output:
        metrics="results/{run}/compare/{variant}/metrics.json",
        per_utterance="results/{run}/compare/{variant}/per_utterance.tsv",
    log:
        "results/{run}/logs/compare_eval_{variant}.log",
    benchmark:
        "results/{run}/benchmarks/compare_eval_{variant}.tsv"
    params:
        model=lambda w: base_model_path(w.run),
        flags=lambda w, input: cli_flags(input, ("model",)),
        settings=lambda w: settings_json(w.run, "eval", "split_as_kit"),
    wildcard_constraints:
        variant="|".join(COMPARE_VARIANTS),
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=8000,
        gpu=1,
        num_workers=lambda w: loader_workers(w.run),
    shell:
        "python -m workflow_scripts.gpu_pool --gpus {resources.gpu:q} --"
        " python -m workflow_scripts.compare eval --variant {wildcards.variant:q} --utterances {input.utterances:q}"
        " --base-model {params.model:q} {params.flags:q} --out-dir results/{wildcards.run:q}/compare/{wildcards.variant:q}"
        " --threads {threads:q} --num-workers {resources.num_workers:q} --settings {params.settings:q} > {log:q} 2>&1"


rule compare_report:
    input:
        lambda w: [f"results/{w.run}/compare/{v}/{name}" for v in compare_variants(w.run)
                   for name in ("metrics.json", "per_utterance.tsv")],
    output:
        report=report("results/{run}/compare/report.md", caption="../config/report_compare.rst", category="6. Comparison"),
        summary="results/{run}/compare/compare.json",
        plot=report("results/{run}/compare/compare.png", caption="../config/report_compare.rst", category="6. Comparison"),
    log:
        "results/{run}/logs/compare_report.log",
    benchmark:
        "results/{run}/benchmarks/compare_report.tsv"
    params:
        variants=lambda w: compare_variants(w.run),
        seed=lambda w: run_settings(w.run)["seed"],
        title=lambda w: f"Does the mixture help? Run {w.run}",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "python -m workflow_scripts.compare_report --variants-dir results/{wildcards.run:q}/compare"
        " --variants {params.variants:q} --seed {params.seed:q} --title {params.title:q}"
        " --out-dir results/{wildcards.run:q}/compare > {log:q} 2>&1"
