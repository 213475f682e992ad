from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("create", views.create),
    path("show/<int:pk>", views.show),
    path("top", views.top),
    path("write-then-read", views.write_then_read),
    path("reads", views.reads),
    path("get-or-create", views.get_or_create),
    path("awhere", views.awhere),
    path("async", views.acreate_then_get),
    path("login", views.log_in),
    path("whoami", views.whoami),
]
