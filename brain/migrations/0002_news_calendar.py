"""Load the shipped news calendar (brain/data/news_calendar.json) into NewsEvent."""
from __future__ import annotations

from django.db import migrations


def load(apps, schema_editor) -> None:
    from brain.news import calendar_rows

    NewsEvent = apps.get_model("brain", "NewsEvent")
    for row in calendar_rows():
        NewsEvent.objects.get_or_create(kind=row["kind"], scheduled_at=row["scheduled_at"], defaults=row)


def unload(apps, schema_editor) -> None:
    from brain.news import calendar_rows

    NewsEvent = apps.get_model("brain", "NewsEvent")
    for row in calendar_rows():
        NewsEvent.objects.filter(kind=row["kind"], scheduled_at=row["scheduled_at"]).delete()


class Migration(migrations.Migration):
    dependencies = [("brain", "0001_initial")]
    operations = [migrations.RunPython(load, unload)]
