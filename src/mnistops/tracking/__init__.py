"""MLflow: every training tracked, every good model registered, `champion` guarded.

- `runs`: a tracked training run (through its client and run id), what train and the flow call
- `registry`: the model registry and its champion gate
- `server`: the tracking server reachable and taking our login
- `plots`: the pictures every run keeps
"""
