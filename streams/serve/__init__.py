"""The web side: HTTP views, their auth and limits, the ingress producer, and worker-to-worker lookups."""
