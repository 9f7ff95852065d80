"""Reusable test support (importable as ``tests.support``).

- ``tests.support.postgres``: ``fresh_database()`` makes a uniquely named database on the local PostgreSQL,
  migrates it with kombinat's Alembic migrations, and drops it afterwards.
- ``tests.support.fake_github``: ``FakeGitHub``, a small real HTTP server on 127.0.0.1 that speaks the
  GitHub OAuth device flow and ``GET /user`` (the only fake: it stands at the network boundary).
- ``tests.support.kombinat_server``: ``running_kombinat()`` starts ``kombinat serve`` (uvicorn) in a subprocess on a
  free loopback port and yields its URL plus an admin token; ``admit_model()`` and ``sign_in()`` help a test
  get a contributor token and an admitted model.
"""
