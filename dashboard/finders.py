"""A static files finder for plotly.js as the installed `plotly` package ships it (one file, no CDN).

Only `plotly/plotly.min.js` is exposed (the package's data folder also holds datasets and a widget
bundle that the cockpit does not use), so `collectstatic` copies that one file.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from django.contrib.staticfiles.finders import BaseFinder
from django.core.checks import Error
from django.core.files.storage import FileSystemStorage

PLOTLY_JS = "plotly/plotly.min.js"


def plotly_js_path() -> Path | None:
    spec = importlib.util.find_spec("plotly")  # found, not imported: importing plotly costs ~0.5 s
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"
    return path if path.is_file() else None


class PlotlyFinder(BaseFinder):
    def check(self, **kwargs: Any) -> list[Error]:
        if plotly_js_path() is None:
            return [Error("plotly.min.js not found: install the pinned plotly package (requirements.txt)",
                          id="dashboard.E001")]
        return []

    def find(self, path: str, find_all: bool = False, **kwargs: Any) -> str | list[str]:
        found = plotly_js_path() if path == PLOTLY_JS else None
        if found is None:
            return [] if find_all else None  # type: ignore[return-value]
        return [str(found)] if find_all else str(found)

    def list(self, ignore_patterns: Any) -> Any:
        found = plotly_js_path()
        if found is not None:
            # collectstatic copies `prefix/path`: plotly/plotly.min.js, read from the package's data folder.
            storage = FileSystemStorage(location=str(found.parent))
            storage.prefix = "plotly"  # type: ignore[attr-defined]
            yield found.name, storage
