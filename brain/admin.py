"""Admin for the playbook versions, the research cache and the news calendar.

Playbook versions are history: saving an edit (or an "add") never rewrites the
version you opened, it stores a NEW version as a CANDIDATE (triggered_by
manual, parent = the active one) through `brain.playbook.playbook_candidate_propose`,
after the same schema validation every version passes, and queues its
out-of-sample validation: it trades only once validated. The one way around
validation is "activate without validation" on a version's page: a person's
explicit action that needs a reason and is journaled with the user name.
"Compare" shows a unified diff of any two versions (the same `playbook_diff`
as `manage.py playbook diff A B`). A version's page shows its validation:
every fold's figures, the test's result and the reason, and (Claude the analyst)
the re-decided cycles of the Claude-aware validation: its cost estimate, calls and
each cycle's two decisions and simulated results.
"""
from __future__ import annotations

import json
from typing import Any

import pydantic
from django import forms
from django.forms.fields import InvalidJSONInput
from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from brain.models import NewsEvent, PlaybookObservation, PlaybookStatus, PlaybookTrigger, PlaybookVersion, ResearchCache
from brain.playbook import (PlaybookError, playbook_activate_forced, playbook_candidate_propose, playbook_current, playbook_diff,
                            playbook_trading_changes)
from brain.playbook_schema import playbook_validate


class PrettyJSONField(forms.JSONField):
    """The playbook as indented JSON in a tall monospace box (not one line), and a syntax error that says where."""

    widget = forms.Textarea(attrs={"rows": 40, "cols": 110, "spellcheck": "false",
                                   "style": "font-family: monospace; font-size: 12px; width: 90%"})

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, InvalidJSONInput):
            return value
        return json.dumps(value, ensure_ascii=False, indent=2, cls=self.encoder)

    def to_python(self, value: Any) -> Any:
        if isinstance(value, str) and value.strip():
            try:
                json.loads(value)
            except json.JSONDecodeError as exc:
                raise forms.ValidationError(f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
                                            code="invalid") from None
        return super().to_python(value)


def playbook_errors(exc: pydantic.ValidationError) -> list[str]:
    """pydantic's errors as one line per problem, each naming the field by its path in the playbook
    (`strategy_definitions.trend_pullback.params.leverage: ...`), not pydantic's raw report."""
    lines = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "the playbook"
        message = error["msg"].removeprefix("Value error, ")
        given = ("" if error["type"] in ("missing", "value_error")
                 else f" (given: {json.dumps(error.get('input'))[:80]})")
        lines.append(f"{where}: {message}{given}")
    return lines


class PlaybookVersionForm(forms.ModelForm):
    playbook = PrettyJSONField(help_text="The whole playbook as JSON; saving stores a new candidate version.")

    class Meta:
        model = PlaybookVersion
        fields = ("playbook", "change_summary")

    def clean_playbook(self) -> dict:
        # Every version, admin edits included, must satisfy the playbook schema.
        data = self.cleaned_data["playbook"]
        try:
            clean = playbook_validate(data).model_dump(mode="json")
        except pydantic.ValidationError as exc:
            raise forms.ValidationError([f"invalid playbook: {line}" for line in playbook_errors(exc)]) from None
        except ValueError as exc:
            raise forms.ValidationError(f"invalid playbook: {exc}") from None
        if self.instance.pk is not None and clean == playbook_validate(self.instance.playbook).model_dump(mode="json"):
            raise forms.ValidationError("the playbook is unchanged: there is no new version to save")
        active = playbook_current()
        if not playbook_trading_changes(active.playbook, clean):
            raise forms.ValidationError(f"the trading content equals the active v{active.version} (statistics alone are "
                                        "not a version): there is no candidate to save")
        return clean


class ForcedActivationForm(forms.Form):
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), required=True, strip=True,
                             help_text="Why this version trades without validation (journaled with your user name)")


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
    list_display = ("version", "status", "triggered_by", "run_id", "change_summary", "verdict", "created_at", "compare",
                    "activate")
    list_filter = ("status", "triggered_by")
    search_fields = ("run_id",)
    readonly_fields = ("version", "status", "triggered_by", "parent_version", "performance_at_update", "validation_report",
                       "changes_report", "evidence", "validated_against", "activated_at", "activated_by", "activation_reason",
                       "validation", "created_at", "run_id", "claude_report")
    fields = ("version", "status", "triggered_by", "run_id", "parent_version", "change_summary", "changes_report", "evidence",
              "playbook", "performance_at_update", "validation_report", "claude_report", "validated_against", "activated_at",
              "activated_by", "activation_reason", "validation", "created_at")

    def get_urls(self) -> list[Any]:
        view = self.admin_site.admin_view(self.diff_view)
        activate = self.admin_site.admin_view(self.activate_view)
        return [path("diff/", view, name="brain_playbookversion_diff"),
                path("<int:pk>/activate/", activate, name="brain_playbookversion_activate"), *super().get_urls()]

    @admin.display(description="validation")
    def verdict(self, obj: PlaybookVersion) -> str:
        v = obj.validation or {}
        return f"{v.get('verdict', '-')}: {str(v.get('reason', ''))[:120]}" if v else "-"

    @admin.display(description="activate")
    def activate(self, obj: PlaybookVersion) -> str:
        if obj.status == PlaybookStatus.ACTIVE:
            return "active"
        return format_html('<a href="{}">activate without validation…</a>',
                           reverse("admin:brain_playbookversion_activate", args=[obj.pk]))

    @admin.display(description="changes (trading fields, why, evidence trades)")
    def changes_report(self, obj: PlaybookVersion) -> str:
        rows = obj.changes or []
        if not rows:
            return "-"
        return format_html("<table><tr><th>field</th><th>old</th><th>new</th><th>why</th><th>trades</th></tr>{}</table>",
                           format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                                            ((c.get("path"), str(c.get("old"))[:200], str(c.get("new"))[:200], c.get("reason", ""),
                                              c.get("evidence_trade_ids", [])) for c in rows)))

    @admin.display(description="validation (folds, test, reason)")
    def validation_report(self, obj: PlaybookVersion) -> str:
        v = obj.validation or {}
        if not v:
            return "not validated yet"
        test = v.get("test") or {}
        folds = format_html_join(
            "", "<tr><td>{}</td><td>{} .. {}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((i, f["from"], f["to"], f["active"]["trades"], f["active"]["pnl"], f["active"]["max_drawdown_pct"],
              f["candidate"]["trades"], f["candidate"]["pnl"], f["candidate"]["max_drawdown_pct"])
             for i, f in enumerate(v.get("folds") or [], 1)))
        return format_html(
            '<p id="validation-verdict"><strong>{}</strong> against v{}: {}</p>'
            "<p>{}: P(candidate better) {} (threshold {}), {} days, {} closed trades (minimum {})</p>"
            "<table><tr><th>fold</th><th>window</th><th>active trades</th><th>active pnl</th><th>active max dd</th>"
            "<th>candidate trades</th><th>candidate pnl</th><th>candidate max dd</th></tr>{}</table>",
            v.get("verdict", "-"), (v.get("current") or {}).get("version"), v.get("reason", ""), test.get("method", "-"),
            test.get("p_candidate_better"), test.get("threshold"), test.get("days"), test.get("closed_trades"),
            test.get("min_trades"), folds)

    @admin.display(description="Claude-aware validation (re-decided cycles)")
    def claude_report(self, obj: PlaybookVersion) -> str:
        c = (obj.validation or {}).get("claude")
        if not c:
            return "-"
        test, est = c.get("test") or {}, c.get("estimate") or {}

        def side(r: dict[str, Any]) -> str:
            extra = r.get("exit") or ("rejected: " + ", ".join(r["rejected"]) if r.get("rejected") else "")
            return f"{r.get('action', '?')} ({r.get('source', '?')}) {r.get('pnl', '?')} {extra}".strip()

        cycles = format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                                  ((r["cycle_id"], r["as_of"], r["inst_id"], side(r["active"]), side(r["candidate"]))
                                   for r in c.get("cycles") or []))
        return format_html(
            '<p id="claude-verdict"><strong>{}</strong>: {}</p>'
            "<p>estimate before any call: {} calls, ${} ({}); {} calls made, ${} spent</p>"
            "<p>{}: P(candidate better) {} (threshold {}), {} cycles, {} simulated trades (minimum {}); pnl active {} "
            "candidate {}</p><table><tr><th>cycle</th><th>as of</th><th>instrument</th><th>active</th>"
            "<th>candidate</th></tr>{}</table>",
            c.get("verdict", "-"), c.get("reason", ""), est.get("calls", "-"), est.get("usd", "-"), est.get("model", "-"),
            c.get("calls", 0), c.get("spent_usd", "0"), test.get("method", "-"), test.get("p_candidate_better"),
            test.get("threshold"), test.get("cycles"), test.get("simulated_trades"), test.get("min_trades"),
            test.get("active_pnl"), test.get("candidate_pnl"), cycles)

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
        # Never rewrite a stored version: the edit becomes a new candidate, validated before it trades.
        edited = f"v{form.instance.version}" if change else "a new playbook"
        summary = (form.cleaned_data.get("change_summary") or "").strip()
        if change and summary == (PlaybookVersion.objects.get(pk=obj.pk).change_summary or "").strip():
            summary = ""  # the old version's summary does not describe this edit
        user = request.user.get_username()
        try:
            saved = playbook_candidate_propose(data=form.cleaned_data["playbook"], triggered_by=PlaybookTrigger.MANUAL,
                                               change_summary=summary or f"manual edit of {edited} by {user}")
        except PlaybookError as exc:  # the form validated already; a race with another save lands here
            raise forms.ValidationError(str(exc)) from exc
        for field in PlaybookVersion._meta.concrete_fields:
            setattr(obj, field.attname, getattr(saved, field.attname))
        messages.info(request, f"saved as playbook v{saved.version}, a CANDIDATE: it trades only once validated (queued); "
                               f"{edited} is kept unchanged")

    def activate_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        """A person activates a version without validation: reason required, journaled with the user name."""
        if not self.has_change_permission(request):
            return HttpResponse(status=403)
        version = get_object_or_404(PlaybookVersion, pk=pk)
        form = ForcedActivationForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                playbook_activate_forced(version=version.version, by=f"{request.user.get_username()} (admin)",
                                         reason=form.cleaned_data["reason"])
            except PlaybookError as exc:
                form.add_error(None, str(exc))
            else:
                messages.warning(request, f"playbook v{version.version} is active WITHOUT validation (journaled)")
                return HttpResponseRedirect(reverse("admin:brain_playbookversion_changelist"))
        context = {**self.admin_site.each_context(request), "opts": self.model._meta, "form": form, "version": version,
                   "title": f"Activate playbook v{version.version} without validation"}
        return TemplateResponse(request, "admin/brain/playbookversion/activate.html", context)

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


@admin.register(PlaybookObservation)
class PlaybookObservationAdmin(admin.ModelAdmin):
    """Statistics reflections measured, recorded against the version that traded (never a version)."""

    list_display = ("id", "version", "mode", "run_id", "created_at")
    readonly_fields = ("version", "statistics", "trade_ids", "reflection_log_id", "mode", "run_id", "created_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


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
