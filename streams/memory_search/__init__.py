"""Memory search: sentence embeddings of memory entries and the index that searches them.

* :mod:`.embedding`: the model interface, the offline WordLlama model and the cache keyed by
  content hash;
* :mod:`.index`: one worker's vector index over the entries of the partitions it owns;
* :mod:`.indexer`: keeps that index in step with the memory tables, batch by batch.
"""
