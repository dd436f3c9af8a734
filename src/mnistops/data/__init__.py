"""Dataset versions: MNIST as PNG folders, published with DVC to the object store.

- `mnist`, `ingest`: the original MNIST files, verified, written as PNG folders
- `images`: what a valid image and dataset folder are (every refusal names the file)
- `packs`: how a version is stored (packs, manifest, record) and read back as untrusted
- `remote`: a version's objects and record in the object store
- `folders`: a version written out as PNG folders, all or nothing
- `adding`: new labelled images merged into the training folders (`data add`)
- `reader`: a published version read back: its record, its objects verified, its manifest
- `registry`: publish, pull and diff versions (the DVC project and its git tags)
"""
