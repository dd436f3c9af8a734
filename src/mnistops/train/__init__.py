"""Training: a data version as cached arrays (`data`), the classifiers (`models`), the
training loop and its evaluation (`loop`)."""
