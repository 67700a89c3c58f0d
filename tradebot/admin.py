"""Bot controls in the admin (halt, halt and flatten, resume: the services of `manage.py bot`) and the searches."""
from __future__ import annotations

from typing import Any

from django.contrib import admin, messages

from tradebot.models import BotControl, SearchStudy, SearchTrial


@admin.register(BotControl)
class BotControlAdmin(admin.ModelAdmin):
    # The scope tells the live bot ("live") from the demo's ("demo") and each replay run's ("replay:<run id>");
    # the actions below act on the live bot, whatever row is ticked.
    list_display = ("scope", "state", "reason", "since", "by", "until", "consecutive_losses", "day_start_equity",
                    "peak_equity")
    readonly_fields = list_display
    actions = ("halt", "halt_and_flatten", "resume")

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def changelist_view(self, request: Any, extra_context: dict[str, Any] | None = None) -> Any:
        from execution.selectors import bot_state

        bot_state()  # make sure the single row exists so there is something to act on
        return super().changelist_view(request, extra_context)

    def _who(self, request: Any) -> str:
        return f"admin:{request.user.get_username()}"

    @admin.action(description="Halt the live bot: no new orders from the next stage on")
    def halt(self, request: Any, queryset: Any) -> None:
        from tradebot.controls import bot_halt_and_flatten

        result = bot_halt_and_flatten(reason=f"halted in the admin by {request.user.get_username()}", by=self._who(request), flatten=False)
        self.message_user(request, f"bot {result['state']}", messages.WARNING)

    @admin.action(description="Halt and flatten the live bot: close every position, cancel algo orders")
    def halt_and_flatten(self, request: Any, queryset: Any) -> None:
        from tradebot.controls import bot_halt_and_flatten

        result = bot_halt_and_flatten(reason=f"halted and flattened in the admin by {request.user.get_username()}",
                                      by=self._who(request), flatten=True)
        self.message_user(request, f"bot {result['state']}; flatten: {result.get('flatten')}", messages.WARNING)

    @admin.action(description="Resume the live bot")
    def resume(self, request: Any, queryset: Any) -> None:
        from execution.bot import bot_resume

        view = bot_resume(by=self._who(request))
        self.message_user(request, f"bot {view.state}")


# --- parameter search (issue 15): read-only mirrors of the Optuna study and its trials --------------------------------


class _ReadOnly(admin.ModelAdmin):
    """Written by `manage.py optimize` and the trial tasks only: the admin lists and shows."""

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False


class SearchTrialInline(admin.TabularInline):
    model = SearchTrial
    fields = ("seq", "number", "state", "value", "params", "worker", "started_at", "finished_at", "reason")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True
    ordering = ("seq",)

    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False


@admin.register(SearchStudy)
class SearchStudyAdmin(_ReadOnly):
    list_display = ("name", "strategy", "status", "trials_done", "trials_target", "best_value", "baseline_value",
                    "best_trial", "candidate_version", "updated_at")
    list_filter = ("status", "strategy")
    search_fields = ("name", "strategy")
    readonly_fields = ("name", "optuna_name", "strategy", "inst_ids", "bounds", "base_version", "training", "source",
                       "cycle_seconds", "trials_target", "seed", "status", "coordinator", "coordinator_seen_at",
                       "baseline_value", "best_trial", "best_value", "best_params", "candidate_version", "message",
                       "created_at", "updated_at")
    inlines = (SearchTrialInline,)

    @admin.display(description="finished trials")
    def trials_done(self, obj: SearchStudy) -> int:
        return obj.trials.filter(state__in=("complete", "pruned", "failed")).count()


@admin.register(SearchTrial)
class SearchTrialAdmin(_ReadOnly):
    list_display = ("study", "seq", "number", "state", "value", "worker", "dispatch", "started_at", "finished_at")
    list_filter = ("state", "dispatch", "study__name")
    readonly_fields = ("study", "seq", "number", "state", "params", "value", "figures", "run_ids", "reason", "dispatch",
                       "worker", "queued_at", "started_at", "finished_at")
