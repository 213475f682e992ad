from __future__ import annotations

from django.urls import path

from blog import views

urlpatterns = [
    path("", views.index, name="index"),
    path("posts", views.new, name="new"),
    path("posts/<int:pk>", views.detail, name="detail"),
]
