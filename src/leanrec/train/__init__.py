"""Training the late ranker from a warehouse: a streaming reader, trainers and metrics."""
