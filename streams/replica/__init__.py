"""Read replicas: processes that serve the read views from the tables' changelogs, processing no task."""
