"""Alembic scripts of the study database, shipped inside the package so an installed wheel finds them."""
