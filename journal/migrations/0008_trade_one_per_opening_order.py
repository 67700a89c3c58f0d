"""One trade per opening order (journal.Trade's trade_one_per_opening_order).

Two account syncs that recovered the same fill at once could each write a trade for it. A journal that
holds such a pair is refused here with the order ids, not silently changed: which of the two rows is
right (the later one may have been reviewed, or added to) is for a person to decide.
"""
from django.db import migrations, models


def _no_duplicates(apps, schema_editor) -> None:
    Trade = apps.get_model("journal", "Trade")
    twice = list(Trade.objects.exclude(client_order_id="").values("client_order_id")
                 .annotate(n=models.Count("id")).filter(n__gt=1).values_list("client_order_id", flat=True)[:20])
    if twice:
        raise RuntimeError(
            "journal_trade holds more than one trade for the opening order(s) " + ", ".join(twice)
            + ": keep one trade per order (SELECT * FROM journal_trade WHERE client_order_id = '...'), then migrate again")


class Migration(migrations.Migration):

    dependencies = [
        ('journal', '0007_issue21_run_indexes'),
        ('market', '0004_issue20_auto_selected'),
    ]

    operations = [
        migrations.RunPython(_no_duplicates, migrations.RunPython.noop),
        migrations.AddConstraint(
            model_name='trade',
            constraint=models.UniqueConstraint(condition=models.Q(('client_order_id', ''), _negated=True), fields=('client_order_id',), name='trade_one_per_opening_order'),
        ),
    ]
