# Conv2D-LSTM: download -> regrid -> normalize -> windows -> train -> evaluate -> (ensemble) -> compare.
# Rules live in workflow/rules/, one file per stage; all logic in the package src/conv2dlstm/.


include: "workflow/rules/common.smk"
include: "workflow/rules/synthetic.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/regrid.smk"
include: "workflow/rules/normalize.smk"
include: "workflow/rules/windows.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/ensemble.smk"
include: "workflow/rules/forecast.smk"


rule all:
    input:
        all_outputs(),
