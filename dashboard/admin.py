"""The admin's cycle and trade pages link to their cockpit pages (and the cockpit links back).

The journal's own admin classes are extended here, not edited: the journal must not know the dashboard.
"""
from __future__ import annotations

from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString

from journal import admin as journal_admin
from journal.models import Cycle, Trade


def _with_cockpit_link(base: type[admin.ModelAdmin], url_name: str) -> type[admin.ModelAdmin]:
    def cockpit(self: admin.ModelAdmin, obj: Cycle | Trade) -> SafeString:
        return format_html('<a href="{}">open in the cockpit</a>', reverse(url_name, args=[obj.pk]))

    cockpit.short_description = "cockpit"  # type: ignore[attr-defined]
    attrs: dict[str, object] = {"cockpit": cockpit, "__module__": __name__}
    if isinstance(getattr(base, "fields", None), (tuple, list)):
        attrs["fields"] = ("cockpit", *base.fields)
        attrs["readonly_fields"] = ("cockpit", *base.readonly_fields)
    else:
        attrs["readonly_fields"] = ("cockpit", *base.readonly_fields)
    return type(base.__name__, (base,), attrs)


for _model, _url in ((Cycle, "dashboard:cycle"), (Trade, "dashboard:trade")):
    _base = type(admin.site._registry[_model])
    admin.site.unregister(_model)
    admin.site.register(_model, _with_cockpit_link(_base, _url))
del journal_admin
