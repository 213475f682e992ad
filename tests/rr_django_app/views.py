"""Views the tests drive through ``django.test.Client``; where each statement ran is
recorded by the tests themselves (execute wrappers on every alias)."""

from __future__ import annotations

import json

from django.contrib.auth import authenticate, login
from django.http import HttpRequest, HttpResponse, JsonResponse

from .models import Post


def create(request: HttpRequest) -> HttpResponse:
    post = Post.objects.create(title=request.POST.get("title", "hello"))
    return JsonResponse({"pk": post.pk})


def show(request: HttpRequest, pk: int) -> HttpResponse:
    return JsonResponse({"titles": [p.title for p in Post.objects.filter(pk=pk)]})


def write_then_read(request: HttpRequest) -> HttpResponse:
    """Two writes, then two reads, in one request."""
    first = Post.objects.create(title="first")
    Post.objects.create(title="second")
    titles = [p.title for p in Post.objects.filter(pk__gte=first.pk).order_by("pk")]
    return JsonResponse({"titles": titles, "count": Post.objects.filter(pk__gte=first.pk).count()})


def reads(request: HttpRequest) -> HttpResponse:
    """Several reads; the aliases they would use."""
    return JsonResponse({"aliases": [Post.objects.all().db for _ in range(6)]})


def get_or_create(request: HttpRequest) -> HttpResponse:
    post, created = Post.objects.get_or_create(title=request.GET["title"])
    return JsonResponse({"pk": post.pk, "created": created})


async def awhere(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"alias": Post.objects.all().db})


def top(request: HttpRequest) -> HttpResponse:
    """The benchmark's view: ten rows through the ORM."""
    return JsonResponse({"titles": [p.title for p in Post.objects.order_by("pk")[:10]]})


async def acreate_then_get(request: HttpRequest) -> HttpResponse:
    post = await Post.objects.acreate(title=request.GET.get("title", "async"))
    read = await Post.objects.aget(pk=post.pk)
    return JsonResponse({"pk": post.pk, "title": read.title})


def log_in(request: HttpRequest) -> HttpResponse:
    data = json.loads(request.body)
    user = authenticate(request, username=data["username"], password=data["password"])
    if user is None:
        return JsonResponse({"ok": False}, status=403)
    login(request, user)
    return JsonResponse({"ok": True})


def whoami(request: HttpRequest) -> HttpResponse:
    return JsonResponse(
        {"authenticated": request.user.is_authenticated, "username": request.user.get_username()}
    )
