"""Bot controls in the admin: halt, halt and flatten, resume (the same services as `manage.py bot`)."""
from __future__ import annotations

from typing import Any

from django.contrib import admin, messages

from tradebot.models import BotControl


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
        from execution.services import bot_resume

        view = bot_resume(by=self._who(request))
        self.message_user(request, f"bot {view.state}")
