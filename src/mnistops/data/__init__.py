"""Dataset versions: MNIST as PNG folders, published with DVC to the object store."""
