"""A small Django app the Django integration tests run against (models, views, urls)."""
