"""HTTP service around editor_core: /edit, /query, /rollback, a Redis edit journal, auth and metrics.

Import :func:`service.main.create_app` to build the app; ``mend serve`` runs it under uvicorn.
"""
