"""lm-evaluation-harness for diffmoe models (the optional ``lm-eval`` extra).

``lm.DiffmoeLM`` is lm-eval's model ``diffmoe``: ``generate_until`` through the serving ``Engine``
(the family's decoding), ``loglikelihood`` from the platform's one validation loss (a Monte-Carlo
ELBO estimate for diffusion models, exact for the AR twin). ``tasks`` writes task YAMLs for the
platform's checkable tasks over local data files; ``job`` runs lm-eval as a Ray task and logs every
metric and the samples to MLflow (``jobs/lm_eval.py``). Importing this package does not import
lm-eval; ``lm`` does.
"""
