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
        "python -m workflow_scripts.compare train --variant {wildcards.variant} --train {input.train}"
        " --val {input.val} --base-model {params.model} {params.flags} --out {output}"
        " --work-dir {params.work_dir} --threads {threads} --settings {params.settings:q} > {log} 2>&1"


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
        flags=lambda w, input: f"--model {input.model}" if "model" in input.keys() else "",
        settings=lambda w: settings_json(w.run, "eval"),
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
        "python -m workflow_scripts.compare eval --variant {wildcards.variant} --utterances {input.utterances}"
        " --base-model {params.model} {params.flags} --out-dir results/{wildcards.run}/compare/{wildcards.variant}"
        " --threads {threads} --num-workers {resources.num_workers} --settings {params.settings:q} > {log} 2>&1"


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
        variants=lambda w: " ".join(compare_variants(w.run)),
        seed=lambda w: run_settings(w.run)["seed"],
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "python -m workflow_scripts.compare_report --variants-dir results/{wildcards.run}/compare"
        " --variants {params.variants} --seed {params.seed} --title 'Does the mixture help? Run {wildcards.run}'"
        " --out-dir results/{wildcards.run}/compare > {log} 2>&1"
