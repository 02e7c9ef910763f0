"""The table of the database cache that throttling counts in (settings.CACHES["throttle"]), made
by `migrate` so that no separate `createcachetable` step is needed."""

from django.core.management import call_command
from django.db import migrations


def create_cache_tables(apps, schema_editor):
    call_command("createcachetable", database=schema_editor.connection.alias, verbosity=0)


class Migration(migrations.Migration):

    dependencies = [
        ("uploads", "0005_grant_owners"),
    ]

    operations = [
        migrations.RunPython(create_cache_tables, migrations.RunPython.noop, elidable=True),
    ]
