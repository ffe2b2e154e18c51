"""The HTTP API's contract: each operation's parameters, bodies and answers, declared once.

The views validate requests with these definitions (``params``, ``bodies``) and
``streams.serve.openapi`` builds the OpenAPI document from the same ones
(``operations``), so the document and the validation cannot drift apart.
"""
