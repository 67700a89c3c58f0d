"""Admin for the playbook versions, the research cache and the news calendar."""
from __future__ import annotations

from django import forms
from django.contrib import admin

from brain.models import NewsEvent, PlaybookVersion, ResearchCache
from brain.playbook_schema import playbook_validate


class PlaybookVersionForm(forms.ModelForm):
    class Meta:
        model = PlaybookVersion
        fields = "__all__"

    def clean_playbook(self) -> dict:
        # Every version, admin edits included, must satisfy the playbook schema.
        data = self.cleaned_data["playbook"]
        try:
            return playbook_validate(data).model_dump(mode="json")
        except ValueError as exc:
            raise forms.ValidationError(f"invalid playbook: {exc}") from None


@admin.register(PlaybookVersion)
class PlaybookVersionAdmin(admin.ModelAdmin):
    form = PlaybookVersionForm
    list_display = ("version", "status", "triggered_by", "change_summary", "created_at")
    list_filter = ("status", "triggered_by")
    readonly_fields = ("created_at",)


@admin.register(ResearchCache)
class ResearchCacheAdmin(admin.ModelAdmin):
    list_display = ("key", "source", "created_at", "ttl_seconds")
    search_fields = ("key", "query")


@admin.register(NewsEvent)
class NewsEventAdmin(admin.ModelAdmin):
    list_display = ("name", "kind", "scheduled_at", "impact", "confidence", "enabled")
    list_filter = ("kind", "impact", "confidence", "enabled")
    list_editable = ("enabled",)
    date_hierarchy = "scheduled_at"
