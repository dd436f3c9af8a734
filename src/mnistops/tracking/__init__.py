"""MLflow: a tracked training run (`runs`), the model registry and its gate (`registry`),
the pictures every run keeps (`plots`)."""
