"""The loop: what the prediction service sees comes back as data.

- `records`: the prediction log's and the feedback's record layout (Parquet), the
  object names, and the checks every object read back passes
- `log_writer`: the service's buffer, written in batches to the object store by a thread
- `feedback`: the answers the service remembers for /feedback, and its rate limit
- `store`: the batches read back from the object store (`mnistops predictions`)
- `labels`: labelled predictions turned into training images (`data add --feedback`)
"""
