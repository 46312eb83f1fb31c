"""`python -m palm.eval ...`: lm-evaluation-harness's own command line with the `palm` model registered."""

import palm.eval.harness  # noqa: F401  (registers the model)
from lm_eval.__main__ import cli_evaluate

if __name__ == "__main__":
    cli_evaluate()
