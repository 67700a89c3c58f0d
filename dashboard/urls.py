from __future__ import annotations

from django.urls import path
from django.views.generic import RedirectView

from dashboard import views

app_name = "dashboard"
urlpatterns = [
    path("", RedirectView.as_view(pattern_name="dashboard:portfolio", query_string=True), name="home"),
    path("portfolio/", views.portfolio, name="portfolio"),
    path("positions/", views.positions, name="positions"),
    path("strategies/", views.strategies, name="strategies"),
    path("brain/", views.brain, name="brain"),
    path("risk/", views.risk, name="risk"),
    path("health/", views.health, name="health"),
    path("playbook/", views.playbook, name="playbook"),
    path("report/", views.report, name="report"),
    path("trades/", views.trades, name="trades"),
    path("trades/<int:pk>/", views.trade, name="trade"),
    path("cycles/", views.cycles, name="cycles"),
    path("cycles/<int:pk>/", views.cycle, name="cycle"),
    path("controls/", views.controls, name="controls"),
]
