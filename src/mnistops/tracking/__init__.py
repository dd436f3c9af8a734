"""MLflow: every training tracked, every good model registered, `champion` guarded.

- `runs`: a tracked training run (through its client and run id), what train and the flow call
- `registry`: the model registry and its champion gate
- `significance`: the gate's statistics (paired McNemar test, the worst digit)
- `predictions`: each run's test predictions, stored for the gate
- `compare`: two versions side by side (`mnistops models --compare`)
- `server`: the tracking server reachable and taking our login
- `plots`: the pictures every run keeps
"""
