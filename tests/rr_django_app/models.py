from __future__ import annotations

from django.db import models


class Author(models.Model):
    name = models.CharField(max_length=100)

    class Meta:
        app_label = "rr_django_app"


class Post(models.Model):
    title = models.CharField(max_length=200)
    author = models.ForeignKey(Author, null=True, on_delete=models.CASCADE)

    class Meta:
        app_label = "rr_django_app"
