# Greedy decoding of the eval split with each utterance's routed expert; SAP WER/CER per etiology.


rule eval:
    input:
        model="results/{run}/asr_best",
        utterances="results/{run}/data/eval.json",
        base=lambda w: base_model_input(w.run),
        # Plots are built with the report so a finished run has everything a person looks at.
        plots=lambda w: plot_targets(w.run),
    output:
        metrics="results/{run}/eval/metrics.json",
        per_utterance="results/{run}/eval/per_utterance.tsv",
        scores=report("results/{run}/eval/scores.html", caption="../config/report_eval.rst", category="5. Evaluation"),
    log:
        "results/{run}/logs/eval.log",
    benchmark:
        "results/{run}/benchmarks/eval.tsv"
    params:
        model=lambda w: base_model_path(w.run),
        settings=lambda w: settings_json(w.run, "eval", "split_as_kit"),
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=8000,
        gpu=1,
        num_workers=lambda w: loader_workers(w.run),
    shell:
        "(python -m workflow_scripts.gpu_pool --gpus {resources.gpu:q} --"
        " python -m workflow_scripts.eval --model {input.model:q} --utterances {input.utterances:q}"
        " --base-model {params.model:q} --out-dir results/{wildcards.run:q}/eval"
        " --threads {threads:q} --num-workers {resources.num_workers:q} --settings {params.settings:q} --update-model-card"
        " && python -m workflow_scripts.report_html eval {output.metrics:q} {output.scores:q}) > {log:q} 2>&1"
