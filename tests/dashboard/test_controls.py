"""Controls on the dashboard: staff only, POST with CSRF, the same services as `manage.py bot`, journaled with who."""
from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.test import Client

from execution.models import BotState, BotStatus
from journal.models import JournalEvent

pytestmark = pytest.mark.django_db
CSRF = "csrfmiddlewaretoken"


@pytest.fixture
def staff() -> Client:
    user = User.objects.create_user("trader", password="pw", is_staff=True)
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


def _post(client: Client, **data: str):  # noqa: ANN202
    page = client.get("/dashboard/controls/")
    token = page.cookies["csrftoken"].value if "csrftoken" in page.cookies else client.cookies["csrftoken"].value
    return client.post("/dashboard/controls/", {**data, CSRF: token}, follow=True)


def test_a_user_who_is_not_staff_gets_the_login_page() -> None:
    user = User.objects.create_user("viewer", password="pw", is_staff=False)
    client = Client()
    client.force_login(user)
    for url in ("/dashboard/portfolio/", "/dashboard/controls/", "/dashboard/trades/1/"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/"), url
    assert Client().get("/dashboard/health/")["Location"].startswith("/admin/login/")


def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(staff: Client) -> None:
    response = staff.post("/dashboard/controls/", {"action": "halt", "reason": "no token"})
    assert response.status_code == 403
    assert not BotState.objects.filter(state=BotStatus.HALTED).exists()


def test_halt_needs_a_reason_is_journaled_with_who_and_a_second_halt_says_so_and_changes_nothing(staff: Client) -> None:
    assert "a halt needs a reason" in _post(staff, action="halt", reason=" ").content.decode()
    assert not BotState.objects.filter(state=BotStatus.HALTED).exists()
    page = _post(staff, action="halt", reason="news in ten minutes").content.decode()
    bot = BotState.objects.get(scope="live")
    assert bot.state == BotStatus.HALTED and bot.by == "dashboard:trader" and bot.reason == "news in ten minutes"
    assert "bot HALTED" in page
    event = JournalEvent.objects.get(kind="bot_halted")
    assert "dashboard:trader" in event.message
    since, events = bot.since, JournalEvent.objects.count()
    page = _post(staff, action="halt", reason="again").content.decode()
    assert "already HALTED" in page and "nothing changed" in page
    bot.refresh_from_db()
    assert bot.since == since and bot.reason == "news in ten minutes" and JournalEvent.objects.count() == events


def test_flatten_asks_to_confirm_first_then_halts_and_flattens(staff: Client) -> None:
    page = _post(staff, action="flatten", reason="get out").content.decode()
    assert 'id="flatten-confirm"' in page and not BotState.objects.filter(state=BotStatus.HALTED).exists()
    page = _post(staff, action="flatten", reason="get out", confirm="yes").content.decode()
    bot = BotState.objects.get(scope="live")
    assert bot.state == BotStatus.HALTED and bot.by == "dashboard:trader" and "flatten:" in page
    assert JournalEvent.objects.filter(kind="positions_flattened").exists()


def test_resume_after_a_halt_and_a_resume_of_a_running_bot_says_so(staff: Client) -> None:
    assert "already RUNNING" in _post(staff, action="resume").content.decode()
    _post(staff, action="halt", reason="pause")
    _post(staff, action="resume")
    bot = BotState.objects.get(scope="live")
    assert bot.state == BotStatus.RUNNING and bot.by == "dashboard:trader"
    assert JournalEvent.objects.filter(kind="bot_running", message__contains="dashboard:trader").exists()


def test_an_unknown_action_or_instrument_is_refused(staff: Client) -> None:
    token = staff.get("/dashboard/controls/").cookies["csrftoken"].value
    assert staff.post("/dashboard/controls/", {"action": "explode", CSRF: token}).status_code == 400
    assert "unknown instrument" in _post(staff, action="run_cycle", inst="NOPE-SWAP").content.decode()
