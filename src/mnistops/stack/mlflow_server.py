"""The stack's MLflow server: `python -m mnistops.stack.mlflow_server ARGS` runs
`mlflow server ARGS` as one process (`compat.mlflow_server_in_one_process`)."""

from __future__ import annotations

import sys

from mnistops.compat import mlflow_server_in_one_process

if __name__ == "__main__":
    mlflow_server_in_one_process(sys.argv[1:])
