#!/usr/bin/env python
"""``DATABASE_URL=... DATABASE_REPLICA_URLS=... python manage.py migrate|runserver|test``."""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
