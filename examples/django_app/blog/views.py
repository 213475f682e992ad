"""The classic: "I just posted and can't see it".

``new`` writes the post and redirects; ``detail`` reads it back on the next
request -- from a replica when one has replayed the write, else from the
primary. The token in the ``rr_token`` cookie carries the write's WAL position
from the first request to the second, on whichever worker serves it.
"""

from __future__ import annotations

from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.utils.html import format_html, format_html_join
from django.views.decorators.http import require_POST

from .models import Post


def index(request: HttpRequest) -> HttpResponse:
    """The ten latest posts (the benchmark's view)."""
    posts = Post.objects.order_by("-id")[:10]
    return HttpResponse(format_html("<ul>{}</ul>", format_html_join("", "<li>{}</li>",
                                    ((p.title,) for p in posts))))  # fmt: skip


@require_POST
def new(request: HttpRequest) -> HttpResponse:
    post = Post.objects.create(title=request.POST.get("title") or "untitled")
    return redirect("detail", pk=post.pk)


def detail(request: HttpRequest, pk: int) -> HttpResponse:
    posts = Post.objects.filter(pk=pk)
    served_by = posts.db  # the router's choice; the request keeps it for its reads
    post = posts.first()
    if post is None:
        raise Http404("no such post")
    return HttpResponse(format_html("<h1>{}</h1><p>served by {}</p>", post.title, served_by))
