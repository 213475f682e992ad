"""Django's TestCase and TransactionTestCase with the router, replicas as
``TEST: {"MIRROR": "default"}``; run by Django's own test runner in a subprocess
(``python -m django test rr_django_app.machinery_cases``)."""

from __future__ import annotations

from django.db import connections
from django.test import Client, TestCase, TransactionTestCase
from django.test.utils import CaptureQueriesContext

from .models import Post

REPLICAS = {"replica1", "replica2"}
ALL = frozenset({"default", *REPLICAS})


def ran_on(alias: str, context: CaptureQueriesContext) -> bool:
    return any("rr_django_app_post" in q["sql"] for q in context.captured_queries)


class ReadsBeforeAnyWrite(TestCase):
    databases = ALL

    def test_a_read_is_routed_to_a_replica_alias(self) -> None:
        self.assertIn(Post.objects.all().db, REPLICAS)
        self.assertEqual(Post.objects.count(), 0)


class WritesInTheTestTransaction(TestCase):
    """The test's writes never commit: the reads that must see them stay on default."""

    databases = ALL

    @classmethod
    def setUpTestData(cls) -> None:
        cls.post = Post.objects.create(title="from setUpTestData")

    def test_reads_see_the_uncommitted_data(self) -> None:
        self.assertEqual(Post.objects.all().db, "default")
        self.assertEqual(Post.objects.get(pk=self.post.pk).title, "from setUpTestData")

    def test_a_client_request_sees_it_and_sets_the_cookie(self) -> None:
        client = Client()
        response = client.post("/create", {"title": "via client"})
        pk = response.json()["pk"]
        self.assertTrue(client.cookies["rr_token"].value)
        self.assertEqual(client.get(f"/show/{pk}").json()["titles"], ["via client"])

    def test_a_write_on_a_replica_alias_runs_on_default(self) -> None:
        with (
            CaptureQueriesContext(connections["default"]) as on_default,
            connections["replica1"].cursor() as cursor,
        ):
            cursor.execute("UPDATE rr_django_app_post SET title = 'moved' WHERE id = %s",
                           [self.post.pk])  # fmt: skip
        self.assertTrue(ran_on("default", on_default))
        self.assertEqual(Post.objects.get(pk=self.post.pk).title, "moved")


class CommittedWrites(TransactionTestCase):
    databases = ALL

    def test_create_then_read(self) -> None:
        post = Post.objects.create(title="committed")
        self.assertEqual(Post.objects.get(pk=post.pk).title, "committed")
        client = Client()
        pk = client.post("/create", {"title": "client"}).json()["pk"]
        self.assertEqual(client.get(f"/show/{pk}").json()["titles"], ["client"])
