"""MLflow: every training tracked, every good model registered, `champion` guarded.

- `contract`: every tag and alias name mnistops writes to MLflow, and the metrics the gate
  and the summaries read (promised; docs/mlflow.md lists the metrics too)
- `runs`: the steps of a tracked training run (through its client and run id), which
  `pipeline` runs for `mnistops train`, the demo and the flow
- `registration`: a run's model logged, signed, registered and judged by the gate
- `model_files`: the one way a registered model is loaded, and the signed record of its
  files that allows it
- `model_fetch`: a version's files brought from the server (MLflow's client, or its REST
  route file by file), then loaded checked or signed for a person who vouches
- `registry`: the model registry and its champion gate
- `significance`: the gate's statistics (paired McNemar test, the worst digit)
- `predictions`: each run's test predictions, stored for the gate
- `compare`: two versions side by side (`mnistops models --compare`)
- `server`: the tracking server reachable and taking our login
- `plots`: the pictures every run keeps
"""
