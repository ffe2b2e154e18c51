"""The live dashboard page (``GET /dashboard``): plain HTML, CSS and a small script, no build step.

The files beside this module are served as they are (:mod:`streams.serve.dashboard.view`);
the script polls the worker's own JSON views and ``/metrics`` (docs/dashboard.md).
"""
