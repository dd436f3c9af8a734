"""Training: data versions as arrays (`data`), the classifiers (`models`), the loop (`loop`)."""
