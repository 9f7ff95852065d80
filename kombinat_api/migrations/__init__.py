"""Alembic migrations, shipped inside the package so `kombinat migrate` works from an installed wheel."""
