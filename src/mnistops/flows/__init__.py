"""Prefect: the scheduled retraining.

- `retrain`: the flow `MNIST` (pull, validate, preprocess, train, evaluate, register)
- `deployment`, `schedules`: its deployment, schedule, trigger, concurrency, zombie runs
- `workers`: the worker process and the environment its flow runs get
- `quick_runs`: a run of the deployment now, followed to its end
- `events`: a published data version announced to Prefect
"""
