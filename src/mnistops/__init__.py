"""mnistops: MNIST MLOps on a local stack of real services.

One room per concern, imported one way (the README's code map): `settings` and `errors`;
`clients` for the services; `stack` runs them; `data` versions the dataset; `train` and
`tracking` make and keep models; `flows` schedules retraining; `predict` and `serving` answer
with the champion; `demo` tells the whole story; `cli` is the command over all of them.
"""


def __getattr__(name: str) -> str:
    # Read lazily: importlib.metadata costs ~0.1 s at every command's start-up.
    if name == "__version__":
        from importlib.metadata import version

        return version("mnistops")
    raise AttributeError(name)
