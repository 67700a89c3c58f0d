from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("execution", "0002_issue17_demo_mode"),
    ]

    operations = [
        migrations.AddField(
            model_name="paperaccount",
            name="clock",
            field=models.CharField(blank=True, default="", help_text="wall or virtual (set by the first price)",
                                   max_length=8),
        ),
    ]
