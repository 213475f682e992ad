"""docs/django.md's pytest-django recipe, run by pytest-django in a subprocess."""

from __future__ import annotations

import pytest

from .models import Post


@pytest.mark.django_db(databases="__all__")
def test_reads_see_the_tests_writes(client) -> None:  # type: ignore[no-untyped-def]
    post = Post.objects.create(title="pytest-django")
    assert Post.objects.get(pk=post.pk).title == "pytest-django"
    pk = client.post("/create", {"title": "client"}).json()["pk"]
    assert client.get(f"/show/{pk}").json()["titles"] == ["client"]


@pytest.mark.django_db(databases="__all__")
def test_without_writes_reads_go_to_a_replica_alias() -> None:
    assert Post.objects.all().db in {"replica1", "replica2"}


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_committed_writes() -> None:
    post = Post.objects.create(title="committed")
    assert Post.objects.get(pk=post.pk).title == "committed"
