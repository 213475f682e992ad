from __future__ import annotations

from blog import views
from django.urls import path

urlpatterns = [
    path("", views.index, name="index"),
    path("posts", views.new, name="new"),
    path("posts/<int:pk>", views.detail, name="detail"),
]
