"""URLs: the admin is the dashboard for now."""
from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
    path("admin/", admin.site.urls),
    path("dashboard/", include("dashboard.urls")),
    # For load balancers and the compose healthchecks (issue 17): database, broker, beat, a worker per queue.
    path("health/", include("dashboard.health")),
]
