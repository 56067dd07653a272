# Inputs of every run: the dataset (generated when synthetic), the base model, the per-stage samples.


rule demo_corpus:
    output:
        directory(f"{CORPORA_DIR}/{{size}}"),
    log:
        f"{CORPORA_DIR}/logs/{{size}}.log",
    benchmark:
        f"{CORPORA_DIR}/benchmarks/{{size}}.tsv"
    params:
        seed=CORPUS_SEED,
        # tiny.en's zero-shot WER per etiology goes into the corpus README, except for tiny (the test and
        # quick corpus), where a handful of utterances per etiology would make it noise and it would add
        # about a minute of CPU to every quick run.
        measure=lambda w: "no" if w.size == "tiny" else "yes",
    wildcard_constraints:
        size="tiny|small|medium",
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=2000,
    shell:
        "(python -m workflow_scripts.demo_corpus --out {output:q} --size {wildcards.size:q}"
        " --seed {params.seed:q} --jobs {threads:q}"
        " && if [ {params.measure:q} = yes ]; then python -m workflow_scripts.demo_corpus --measure {output:q}; fi)"
        " > {log:q} 2>&1"


# A local rule: on a cluster it runs on the submitting host, the one host allowed to reach the hub (with the
# user's own HF_HUB_OFFLINE, see common.smk); the conversions of bundled models take seconds there too.
rule base_model:
    output:
        directory(f"{MODELS_DIR}/{{name}}"),
    log:
        f"{MODELS_DIR}/logs/{{name}}.log",
    benchmark:
        f"{MODELS_DIR}/benchmarks/{{name}}.tsv"
    params:
        spec=lambda w: spec_of_folder(w.name),
    wildcard_constraints:
        name=rf"tiny-random|tiny\.en|base|small|{HUB_FOLDER}/[\w.-]+",
    localrule: True
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
    shell:
        "HF_HUB_OFFLINE=\"$USER_HF_HUB_OFFLINE\" TRANSFORMERS_OFFLINE=\"$USER_TRANSFORMERS_OFFLINE\""
        " python -m workflow_scripts.base_model --spec {params.spec:q} --out {output:q} > {log:q} 2>&1"


# A SAP download (<Split>/*.tar of per-speaker tars) unpacked once per download, resumable tar by tar: the work
# goes to <dataset>.partial, outside the declared folder that Snakemake deletes before rerunning a job. The
# download is `ancient`: a touched download folder must not redo hours of unpacking (to add tars later, run
# `python -m workflow_scripts.sap_download` on the existing dataset folder; it unpacks only the new ones).
rule unpack_download:
    input:
        download=lambda w: ancient(download_of(w.name)),
    output:
        dataset=directory(f"{DATASETS_DIR}/{{name}}/dataset"),
        report=f"{DATASETS_DIR}/{{name}}/unpack_report.json",
    log:
        f"{DATASETS_DIR}/logs/{{name}}.log",
    benchmark:
        f"{DATASETS_DIR}/benchmarks/{{name}}.tsv"
    wildcard_constraints:
        name=r"[\w.-]+-[0-9a-f]{8}",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
    shell:
        "python -m workflow_scripts.sap_download --download {input.download:q} --out {output.dataset:q}"
        " --report {output.report:q} > {log:q} 2>&1"


rule prepare_data:
    input:
        dataset=lambda w: dataset_path(w.run),
    output:
        embedding="results/{run}/data/embedding.json",
        expert="results/{run}/data/expert.json",
        asr_train="results/{run}/data/asr_train.json",
        asr_val="results/{run}/data/asr_val.json",
        eval="results/{run}/data/eval.json",
        report="results/{run}/data_report.json",
        report_html=report("results/{run}/data_report.html", caption="../config/report_data.rst", category="1. Data"),
    log:
        "results/{run}/logs/prepare_data.log",
    benchmark:
        "results/{run}/benchmarks/prepare_data.tsv"
    params:
        settings=lambda w: settings_json(w.run, "data", "train_split", "eval_split", "split_as_kit"),
        unpack_report=lambda w: unpack_report_flags(w.run),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
    shell:
        "(python -m workflow_scripts.data --dataset-root {input.dataset:q}"
        " --out-dir results/{wildcards.run:q}/data --report {output.report:q} --settings {params.settings:q}"
        " {params.unpack_report:q}"
        " && python -m workflow_scripts.report_html data {output.report:q} {output.report_html:q}) > {log:q} 2>&1"
