"""Prefect: the retraining flow (`retrain`) and its deployment, workers and runs (`deploy`)."""
