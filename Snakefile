# Mixture-of-LoRA-experts Whisper for atypical speech (SAP data).
# Targets live under results/<run>/; runs are named in config (config/config.yaml, --configfile).
#   snakemake --cores 2 --profile profiles/cpu results/quick/eval/metrics.json
from snakemake.utils import min_version

# 9.20: numeric `runtime` resources are read correctly again (misread in 9.16-9.19).
min_version("9.20")


# Absolute, so `snakemake -s <repo>/Snakefile --directory <elsewhere>` finds it too.
configfile: f"{workflow.basedir}/config/config.yaml"


include: "rules/common.smk"


# `snakemake --report report.html results/<run>/eval/metrics.json`: plots and tables with captions.
report: "report/workflow.rst"


wildcard_constraints:
    run="[A-Za-z0-9][A-Za-z0-9_-]*",
    expert=r"\d+",


include: "rules/data.smk"
include: "rules/embeddings.smk"
include: "rules/clustering.smk"
include: "rules/gating.smk"
include: "rules/experts.smk"
include: "rules/asr.smk"
include: "rules/eval.smk"
include: "rules/compare.smk"


rule all:
    input:
        final_targets,
