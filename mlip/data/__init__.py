"""Data: reading labelled structures (`reader`), neighbour lists, padded batches and normalisation statistics."""
