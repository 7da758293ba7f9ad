"""The experiments of docs/RESULTS.md, one module each: `python -m experiments.NAME` from the repository root
(or `bash run.sh experiments NAME`); their numbers and figures are written to docs/results/NAME/."""
