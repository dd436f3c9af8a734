"""mnistops: MNIST MLOps on a local stack of real services."""


def __getattr__(name: str) -> str:
    # Read lazily: importlib.metadata costs ~0.1 s at every command's start-up.
    if name == "__version__":
        from importlib.metadata import version

        return version("mnistops")
    raise AttributeError(name)
