"""The processing engine: batches of task events in, agent handlers run, table rows and changelogs out."""
