"""A settings module for running Django's own test runner (and pytest-django) in a
subprocess against a sandbox: ``RR_DJANGO_DATABASES`` holds DATABASES as JSON."""

from __future__ import annotations

import json
import os

from django_support import MIDDLEWARE, ROUTER_SETTING

SECRET_KEY = "replica-router-tests"
ALLOWED_HOSTS = ["*"]
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "rr_django_app",
]
ROOT_URLCONF = "rr_django_app.urls"
DATABASES = json.loads(os.environ["RR_DJANGO_DATABASES"])
DATABASE_ROUTERS = ["replica_router.integrations.django.ReplicaRouter"]
REPLICA_ROUTER = ROUTER_SETTING
__all__ = ["MIDDLEWARE"]  # re-exported as a setting
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
