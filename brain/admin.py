"""Admin for the playbook versions, the research cache and the news calendar.

Playbook versions are history: saving an edit never rewrites the version you
opened, it stores a NEW active version (triggered_by manual, parent = the one
edited) through `brain.playbook.playbook_save`, after the same schema
validation every version passes. "Compare" shows a unified diff of any two
versions (the same `playbook_diff` as `manage.py playbook diff A B`).
"""
from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from brain.models import NewsEvent, PlaybookTrigger, PlaybookVersion, ResearchCache
from brain.playbook import PlaybookError, playbook_diff, playbook_save
from brain.playbook_schema import playbook_validate


class PlaybookVersionForm(forms.ModelForm):
    class Meta:
        model = PlaybookVersion
        fields = ("playbook", "change_summary")

    def clean_playbook(self) -> dict:
        # Every version, admin edits included, must satisfy the playbook schema.
        data = self.cleaned_data["playbook"]
        try:
            clean = playbook_validate(data).model_dump(mode="json")
        except ValueError as exc:
            raise forms.ValidationError(f"invalid playbook: {exc}") from None
        if self.instance.pk is not None and clean == playbook_validate(self.instance.playbook).model_dump(mode="json"):
            raise forms.ValidationError("the playbook is unchanged: there is no new version to save")
        return clean


class DiffForm(forms.Form):
    a = forms.TypedChoiceField(label="from version", coerce=int)
    b = forms.TypedChoiceField(label="to version", coerce=int)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        choices = [(v, f"v{v} ({s})") for v, s in PlaybookVersion.objects.order_by("-version").values_list("version", "status")]
        self.fields["a"].choices = choices
        self.fields["b"].choices = choices


@admin.register(PlaybookVersion)
class PlaybookVersionAdmin(admin.ModelAdmin):
    form = PlaybookVersionForm
    list_display = ("version", "status", "triggered_by", "change_summary", "created_at", "compare")
    list_filter = ("status", "triggered_by")
    readonly_fields = ("version", "status", "triggered_by", "parent_version", "performance_at_update", "validation", "created_at")
    fields = ("version", "status", "triggered_by", "parent_version", "change_summary", "playbook", "performance_at_update",
              "validation", "created_at")

    def get_urls(self) -> list[Any]:
        view = self.admin_site.admin_view(self.diff_view)
        return [path("diff/", view, name="brain_playbookversion_diff"), *super().get_urls()]

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # history is kept; a bad version is rolled back by a new one

    @admin.display(description="compare")
    def compare(self, obj: PlaybookVersion) -> str:
        if obj.parent_version is None:
            return "-"
        url = reverse("admin:brain_playbookversion_diff")
        return format_html('<a href="{}">diff v{} → v{}</a>', f"{url}?a={obj.parent_version}&b={obj.version}",
                           obj.parent_version, obj.version)

    def save_model(self, request: HttpRequest, obj: PlaybookVersion, form: forms.ModelForm, change: bool) -> None:
        # Never rewrite a stored version: the edit becomes a new active version.
        edited = f"v{form.instance.version}" if change else "a new playbook"
        summary = (form.cleaned_data.get("change_summary") or "").strip()
        if change and summary == (PlaybookVersion.objects.get(pk=obj.pk).change_summary or "").strip():
            summary = ""  # the old version's summary does not describe this edit
        try:
            saved = playbook_save(data=form.cleaned_data["playbook"], triggered_by=PlaybookTrigger.MANUAL,
                                  change_summary=summary or f"manual edit of {edited} by {request.user.get_username()}")
        except PlaybookError as exc:  # the form validated already; a race with another save lands here
            raise forms.ValidationError(str(exc)) from exc
        for field in PlaybookVersion._meta.concrete_fields:
            setattr(obj, field.attname, getattr(saved, field.attname))
        messages.info(request, f"saved as playbook v{saved.version} (active, triggered_by manual); {edited} is kept unchanged")

    def diff_view(self, request: HttpRequest) -> HttpResponse:
        form = DiffForm(request.GET or None)
        lines: list[str] | None = None
        versions: tuple[PlaybookVersion, PlaybookVersion] | None = None
        if form.is_valid():
            a = PlaybookVersion.objects.get(version=form.cleaned_data["a"])
            b = PlaybookVersion.objects.get(version=form.cleaned_data["b"])
            versions, lines = (a, b), playbook_diff(a, b)
        context = {
            **self.admin_site.each_context(request), "opts": self.model._meta, "title": "Compare playbook versions",
            "form": form, "lines": lines, "versions": versions,
        }
        return TemplateResponse(request, "admin/brain/playbookversion/diff.html", context)


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
