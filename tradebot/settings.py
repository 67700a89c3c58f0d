"""Django settings for tradebot, all read from the environment.

`.env.example` lists every variable with its default and meaning. A bad value
stops the process at start with a message naming the variable
(`tradebot.env.ImproperSetting`). Secrets are read only from the environment
and never logged (see `tradebot.logging`).
"""
from __future__ import annotations

import json
import os
import sys
from decimal import Decimal
from pathlib import Path
from urllib.parse import unquote, urlparse

from tradebot.env import (
    ImproperSetting,
    env_bool,
    env_choice,
    env_decimal,
    env_float,
    env_int,
    env_list,
    env_secret,
    env_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("TRADEBOT_VAR_DIR", str(BASE_DIR / "var")))
# The SQLite file and the embedded broker live here; a fresh clone has no var/.
VAR_DIR.mkdir(parents=True, exist_ok=True)
# numba's compiled-kernel cache (indicators): a writable place shared by every
# process, so workers don't recompile (~10 s) when the code dir is read-only.
os.environ.setdefault("NUMBA_CACHE_DIR", str(VAR_DIR / "numba"))

# --- Django core -----------------------------------------------------------
DEBUG = env_bool("DJANGO_DEBUG", False)
SECRET_KEY = env_secret("DJANGO_SECRET_KEY") or "dev-only-insecure-key-set-DJANGO_SECRET_KEY-in-production"
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "import_export",  # the instruments' watchlist: CSV import/export in the admin (issue 20)
    "market",
    "journal",
    "brain",
    "execution",
    "tradebot",
    "dashboard",  # the cockpit (issue 17): an interface layer above tradebot
    "health_check",  # /health/ (issue 17, django-health-check): its HTML page's template
    "telegram_bot",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files (the admin's CSS) with DEBUG off, from STATIC_ROOT that `collectstatic` fills (issue 17).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "tradebot.urls"
WSGI_APPLICATION = "tradebot.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
# The cockpit's charts: plotly.js from the installed plotly package as /static/plotly/plotly.min.js (no CDN).
STATICFILES_FINDERS = [
    "django.contrib.staticfiles.finders.FileSystemFinder",
    "django.contrib.staticfiles.finders.AppDirectoriesFinder",
    "dashboard.finders.PlotlyFinder",
]
DASHBOARD_PING_TIMEOUT_SECONDS = env_float("DASHBOARD_PING_TIMEOUT_SECONDS", 0.5, minimum=0.05)
# /health/ (issue 17): beat's last tick may be this old (django-celery-beat writes it every 3 minutes), and
# how long each queue's Celery ping waits for the workers' answers.
HEALTH_BEAT_MAX_AGE_SECONDS = env_int("HEALTH_BEAT_MAX_AGE_SECONDS", 600, minimum=10)
HEALTH_PING_TIMEOUT_SECONDS = env_float("HEALTH_PING_TIMEOUT_SECONDS", 1.0, minimum=0.1)
# Whether /health/ fails when `manage.py stream_okx`'s connections are not up: "auto" when the stream is expected
# (MARKET_DATA_SOURCE=okx, as `make run` sets it for its children on OKX's market; with "auto", once a stream has
# written its status in this database, as compose's `stream` service does), "yes" always, "no" never.
HEALTH_STREAMS = env_choice("HEALTH_STREAMS", "auto", ("auto", "yes", "no"))
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


# --- Database --------------------------------------------------------------
# Several processes (workers, beat, the admin) share the SQLite file: WAL lets
# readers run beside a writer, IMMEDIATE takes the write lock at BEGIN so a
# transaction never fails on a read-to-write upgrade, and the timeout makes a
# writer wait its turn instead of failing with "database is locked".
SQLITE_OPTIONS: dict[str, object] = {
    "timeout": 30,
    "transaction_mode": "IMMEDIATE",
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
}

def database_from_url(url: str | None) -> tuple[dict[str, object], bool]:
    """Return Django's DATABASES['default'] and whether TimescaleDB is asked for.

    SQLite when no URL is set. `postgres://` / `postgresql://` use Django's own
    PostgreSQL backend. `timescale://` / `timescaledb://` also use Django's own
    backend, and the market migration turns the candle table into a hypertable
    (see README, "TimescaleDB").
    """
    if not url:
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": str(VAR_DIR / "tradebot.sqlite3"),
                "OPTIONS": SQLITE_OPTIONS}, False
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme == "sqlite":
        # sqlite:///relative/path or sqlite:////absolute/path
        name = unquote(parsed.path[1:]) if parsed.path.startswith("/") else unquote(parsed.path)
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": name or ":memory:", "OPTIONS": SQLITE_OPTIONS}, False
    if scheme not in {"postgres", "postgresql", "timescale", "timescaledb"}:
        raise ImproperSetting(
            f"DATABASE_URL must start with sqlite://, postgres://, postgresql://, timescale:// or timescaledb://, got scheme {scheme!r}"
        )
    if not parsed.path or parsed.path == "/":
        raise ImproperSetting("DATABASE_URL must name a database, e.g. postgres://user@127.0.0.1:5432/tradebot")
    config: dict[str, object] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parsed.path[1:]),
        "USER": unquote(parsed.username or ""),
        "PASSWORD": unquote(parsed.password or ""),
        "HOST": parsed.hostname or "",
        "PORT": str(parsed.port or ""),
        "CONN_MAX_AGE": 60,
        # Kept on: a web request, beat or a command must not fail on a session PostgreSQL ended (a restart).
        # Django checks with a SELECT 1 before each request's (task's) first query; Celery workers check
        # the socket instead, without a round trip (tradebot.tasks.db_task_boundary), and skip that SELECT.
        "CONN_HEALTH_CHECKS": True,
    }
    return config, scheme in {"timescale", "timescaledb"}


_db, TIMESCALEDB = database_from_url(os.environ.get("DATABASE_URL", "").strip() or None)
DATABASES = {"default": _db}
if _db["ENGINE"] == "django.db.backends.postgresql":
    # A per-process test database name lets two test runs share one server.
    DATABASES["default"]["TEST"] = {"NAME": f"test_{_db['NAME']}_{os.getpid()}"}

# --- Broker (Celery) -------------------------------------------------------
REDIS_URL = env_str("REDIS_URL", "")
BROKER_DIR = VAR_DIR / "broker"
if REDIS_URL:
    CELERY_BROKER_URL = REDIS_URL
    BROKER_KIND = "redis"
    # How long a task taken by a worker that died (SIGKILL, power loss) stays
    # invisible before Redis hands it to another worker. Stages are idempotent,
    # so a short timeout only costs a harmless duplicate.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        # Default: the stage tasks' hard time limit plus 10 s (a task still running is never handed out twice).
        "visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", env_int("CELERY_TASK_TIME_LIMIT", 180, minimum=1) + 10,
                                      minimum=1),
        # A per-deployment (or per-test-run) prefix keeps two bots on one Redis apart.
        "global_keyprefix": env_str("CELERY_REDIS_KEY_PREFIX", ""),
    }
else:
    # Embedded broker: kombu's filesystem transport needs no server and works
    # with a worker and beat on one machine.
    CELERY_BROKER_URL = "filesystem://"
    CELERY_BROKER_TRANSPORT = "tradebot.broker:Transport"  # atomic message files (see tradebot/broker.py)
    BROKER_KIND = "filesystem"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "processed_folder": str(BROKER_DIR / "processed"),
        # Broadcast (pidbox) exchange files: kombu's default is ./control in the cwd.
        "control_folder": str(BROKER_DIR / "control"),
        "store_processed": False,
        # kombu polls the folder once a second by default: seven hops per cycle would cost seconds.
        "polling_interval": env_float("CELERY_FS_POLLING_INTERVAL", 0.05, minimum=0.01),
    }
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 120, minimum=1)
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 180, minimum=1)
if CELERY_TASK_TIME_LIMIT <= CELERY_TASK_SOFT_TIME_LIMIT:
    raise ImproperSetting("CELERY_TASK_TIME_LIMIT must be greater than CELERY_TASK_SOFT_TIME_LIMIT")

# --- The cycle -------------------------------------------------------------
INSTRUMENTS = env_list("INSTRUMENTS", ["BTC-USDT-SWAP"])
TIMEFRAMES = ["15m", "1H", "4H"]
DECISION_CYCLE_SECONDS = env_int("DECISION_CYCLE_SECONDS", 300, minimum=10)
ACCOUNT_SYNC_SECONDS = env_int("ACCOUNT_SYNC_SECONDS", 15, minimum=1)
INDICATOR_HISTORY_CANDLES = env_int("INDICATOR_HISTORY_CANDLES", 1000, minimum=50)
SNAPSHOT_RECENT_CANDLES = env_int("SNAPSHOT_RECENT_CANDLES", 5, minimum=1)
# auto: OKX public data when reachable, otherwise the synthetic market (said aloud).
# replay: the candles in MARKET_REPLAY_DIR on the cycle's virtual clock (the demo's workers on OKX data).
MARKET_DATA_SOURCE = env_choice("MARKET_DATA_SOURCE", "auto", ("auto", "okx", "synthetic", "replay"))
MARKET_REPLAY_DIR = Path(env_str("MARKET_REPLAY_DIR", str(VAR_DIR / "market-replay")))
SYNTHETIC_SEED = env_int("SYNTHETIC_SEED", 7)
# A cycle whose stage started longer ago than the stage task's hard time limit plus this grace (a hop) is marked
# INTERRUPTED by the next tick, so a lost worker blocks its instrument for one stage limit at most.
CYCLE_STAGE_GRACE_SECONDS = env_int("CYCLE_STAGE_GRACE_SECONDS", 10, minimum=0)

# --- OKX -------------------------------------------------------------------
OKX_API_KEY = env_secret("OKX_API_KEY")
OKX_API_SECRET = env_secret("OKX_API_SECRET")
OKX_PASSPHRASE = env_secret("OKX_PASSPHRASE")
OKX_BASE_URL = env_str("OKX_BASE_URL", "https://www.okx.com")
OKX_DEMO = env_bool("OKX_DEMO", True)  # python-okx flag "1" = demo trading
OKX_LIVE_TRADING = env_bool("OKX_LIVE_TRADING", False)
OKX_TIMEOUT_SECONDS = env_float("OKX_TIMEOUT_SECONDS", 10.0, minimum=0.1)
OKX_MAX_RETRIES = env_int("OKX_MAX_RETRIES", 3, minimum=0)
# MARKET_DATA_SOURCE=auto: how long the OKX reachability probe may take before falling back.
MARKET_PROBE_TIMEOUT_SECONDS = env_float("MARKET_PROBE_TIMEOUT_SECONDS", 3.0, minimum=0.1)
if OKX_LIVE_TRADING and OKX_DEMO:
    raise ImproperSetting("OKX_LIVE_TRADING=true needs OKX_DEMO=false as well; both say which account is traded")

# --- OKX streams (manage.py stream_okx, issue 19) ------------------------------
# WebSocket host; empty: wss://wspap.okx.com:8443 (demo) or wss://ws.okx.com:8443 (live). /ws/v5/... is appended.
OKX_WS_URL = env_str("OKX_WS_URL", "")
# A stream's data is used by COLLECTING instead of REST while its connection is up and its last push is this recent.
STREAM_FRESH_SECONDS = env_int("STREAM_FRESH_SECONDS", 120, minimum=1)
# How often the stream writes the latest tickers/books/funding/open interest and its status (seconds).
STREAM_FLUSH_SECONDS = env_float("STREAM_FLUSH_SECONDS", 1.0, minimum=0.01)
# OKX drops a connection silent for 30 s: ping after this many silent seconds (< 30).
STREAM_PING_SECONDS = env_float("STREAM_PING_SECONDS", 25.0, minimum=0.1, maximum=29.0)
# Reconnect backoff: the first wait, doubling up to the cap (seconds).
STREAM_BACKOFF_FIRST_SECONDS = env_float("STREAM_BACKOFF_FIRST_SECONDS", 1.0, minimum=0.01)
STREAM_BACKOFF_MAX_SECONDS = env_float("STREAM_BACKOFF_MAX_SECONDS", 60.0, minimum=0.01)

# --- Paper exchange --------------------------------------------------------
# Which bot this process is (issue 17): "live" (`make run`, compose) or "demo" (`manage.py demo` sets it for its
# workers); the demo's cycles, trades and orders carry mode "demo" and it trades its own paper account.
BOT_MODE = env_choice("BOT_MODE", "live", ("live", "demo"))
PAPER_ACCOUNT = env_str("PAPER_ACCOUNT", "demo" if BOT_MODE == "demo" else "default")
PAPER_START_BALANCE = env_decimal("PAPER_START_BALANCE", "10000", minimum=Decimal("1"))
PAPER_SLIPPAGE = env_decimal("PAPER_SLIPPAGE", "0.0005", minimum=Decimal("0"), maximum=Decimal("0.05"))
PAPER_TAKER_FEE = env_decimal("PAPER_TAKER_FEE", "0.0005", minimum=Decimal("0"), maximum=Decimal("0.01"))
PAPER_MAKER_FEE = env_decimal("PAPER_MAKER_FEE", "0.0002", minimum=Decimal("-0.01"), maximum=Decimal("0.01"))
PAPER_MAINT_MARGIN_RATE = env_decimal("PAPER_MAINT_MARGIN_RATE", "0.004", minimum=Decimal("0"), maximum=Decimal("0.5"))

# --- Risk gate (code reads these; no model or playbook can change them) ----
MAX_DAILY_LOSS_PCT = env_decimal("MAX_DAILY_LOSS_PCT", "0.03", minimum=Decimal("0"), maximum=Decimal("1"))
MAX_DRAWDOWN_PCT = env_decimal("MAX_DRAWDOWN_PCT", "0.10", minimum=Decimal("0"), maximum=Decimal("1"))
MAX_CONCURRENT_POSITIONS = env_int("MAX_CONCURRENT_POSITIONS", 3, minimum=0)
MAX_TOTAL_EXPOSURE_PCT = env_decimal("MAX_TOTAL_EXPOSURE_PCT", "0.15", minimum=Decimal("0"), maximum=Decimal("10"))
MAX_SINGLE_TRADE_PCT = env_decimal("MAX_SINGLE_TRADE_PCT", "0.05", minimum=Decimal("0"), maximum=Decimal("10"))
MAX_LEVERAGE = env_decimal("MAX_LEVERAGE", "3", minimum=Decimal("1"), maximum=Decimal("125"))
MAX_SL_DISTANCE_PCT = env_decimal("MAX_SL_DISTANCE_PCT", "0.03", minimum=Decimal("0"), maximum=Decimal("1"))
MIN_RR_RATIO = env_decimal("MIN_RR_RATIO", "1.5", minimum=Decimal("0"))
MAX_CONSECUTIVE_LOSSES = env_int("MAX_CONSECUTIVE_LOSSES", 3, minimum=1)
COOLDOWN_AFTER_LOSS_STREAK = env_int("COOLDOWN_AFTER_LOSS_STREAK", 1800, minimum=0)
MAX_CORRELATION = env_decimal("MAX_CORRELATION", "0.8", minimum=Decimal("-1"), maximum=Decimal("1"))
CORRELATION_LOOKBACK_HOURS = env_int("CORRELATION_LOOKBACK_HOURS", 168, minimum=24)

# --- Market anomaly and research triggers ---------------------------------
ANOMALY_MOVE_1H_PCT = env_decimal("ANOMALY_MOVE_1H_PCT", "0.03", minimum=Decimal("0"))
FUNDING_SPIKE_HIGH = env_decimal("FUNDING_SPIKE_HIGH", "0.0005")
FUNDING_SPIKE_LOW = env_decimal("FUNDING_SPIKE_LOW", "-0.0003")
OI_CHANGE_4H_PCT = env_decimal("OI_CHANGE_4H_PCT", "0.10", minimum=Decimal("0"))
NEWS_WINDOW_MINUTES = env_int("NEWS_WINDOW_MINUTES", 30, minimum=0)

# --- LLM brain -------------------------------------------------------------
ANTHROPIC_API_KEY = env_secret("ANTHROPIC_API_KEY")
ANTHROPIC_BASE_URL = env_str("ANTHROPIC_BASE_URL", "")
# BRAIN: auto = Claude when ANTHROPIC_API_KEY is set, otherwise the rules brain.
BRAIN = env_choice("BRAIN", "auto", ("auto", "claude", "rules"))
ANALYST_MODEL = env_str("ANALYST_MODEL", "claude-opus-4-6")
SCREENER_MODEL = env_str("SCREENER_MODEL", "claude-haiku-4-5-20251001")
REFLECTION_MODEL = env_str("REFLECTION_MODEL", "claude-opus-4-6")
ANALYST_TEMPERATURE = env_float("ANALYST_TEMPERATURE", 0.2, minimum=0.0, maximum=1.0)
REFLECTION_TEMPERATURE = env_float("REFLECTION_TEMPERATURE", 0.3, minimum=0.0, maximum=1.0)
ANALYST_MAX_TOKENS = env_int("ANALYST_MAX_TOKENS", 4096, minimum=16)
SCREENER_MAX_TOKENS = env_int("SCREENER_MAX_TOKENS", 100, minimum=1)
REFLECTION_MAX_TOKENS = env_int("REFLECTION_MAX_TOKENS", 8192, minimum=16)
# 90 s: an Opus analysis thinking at medium effort takes 10-60 s (issue 20); 30 s made every long one a HOLD.
ANALYST_TIMEOUT_SECONDS = env_float("ANALYST_TIMEOUT_SECONDS", 90.0, minimum=1.0)
SCREENER_TIMEOUT_SECONDS = env_float("SCREENER_TIMEOUT_SECONDS", 10.0, minimum=1.0)
REFLECTION_TIMEOUT_SECONDS = env_float("REFLECTION_TIMEOUT_SECONDS", 120.0, minimum=1.0)
LLM_EFFORT = env_choice("LLM_EFFORT", "medium", ("low", "medium", "high", "max"))
LLM_DAILY_BUDGET_USD = env_decimal("LLM_DAILY_BUDGET_USD", "10", minimum=Decimal("0"))
LLM_BUDGET_WARN_FRACTION = env_decimal("LLM_BUDGET_WARN_FRACTION", "0.8", minimum=Decimal("0"), maximum=Decimal("1"))
LLM_DEGRADE_MODE = env_choice("LLM_DEGRADE_MODE", "rules", ("rules", "hold"))
SCREENER_ENABLED = env_bool("SCREENER_ENABLED", True)
SCREENER_BYPASS_ON_POSITION = env_bool("SCREENER_BYPASS_ON_POSITION", True)
SCREENER_BYPASS_ON_NEWS = env_bool("SCREENER_BYPASS_ON_NEWS", True)
SCREENER_MIN_PASS_RATE = env_decimal("SCREENER_MIN_PASS_RATE", "0.10", minimum=Decimal("0"), maximum=Decimal("1"))
# Issue 20: thinking per purpose, the position watch, the analyst's skip of an unchanged snapshot.
SCREENER_EFFORT = env_choice("SCREENER_EFFORT", "low", ("low", "medium", "high", "max"))
ANALYST_EFFORT = env_choice("ANALYST_EFFORT", LLM_EFFORT, ("low", "medium", "high", "max"))
REFLECTION_EFFORT = env_choice("REFLECTION_EFFORT", LLM_EFFORT, ("low", "medium", "high", "max"))
ANALYST_THINKING_BUDGET = env_int("ANALYST_THINKING_BUDGET", 0, minimum=0)
REFLECTION_THINKING_BUDGET = env_int("REFLECTION_THINKING_BUDGET", 0, minimum=0)
POSITION_WATCH_ENABLED = env_bool("POSITION_WATCH_ENABLED", True)
POSITION_WATCH_ATR_MULTIPLE = env_decimal("POSITION_WATCH_ATR_MULTIPLE", "1.0", minimum=Decimal("0"))
POSITION_WATCH_SLTP_NEAR_ATR = env_decimal("POSITION_WATCH_SLTP_NEAR_ATR", "0.5", minimum=Decimal("0"))
POSITION_WATCH_MAX_INTERVAL_SECONDS = env_int("POSITION_WATCH_MAX_INTERVAL_SECONDS", 3600, minimum=60)
# The routine review at the max interval (no trigger) first asks the screener model a short position check; the
# analyst is woken only when it says so, a check fails, or the last analyst review is older than the hard maximum.
POSITION_WATCH_PERIODIC_CHECK = env_bool("POSITION_WATCH_PERIODIC_CHECK", True)
POSITION_WATCH_MAX_UNREVIEWED_SECONDS = env_int("POSITION_WATCH_MAX_UNREVIEWED_SECONDS", 14400, minimum=60)
ANALYST_SKIP_UNCHANGED = env_bool("ANALYST_SKIP_UNCHANGED", True)
ANALYST_UNCHANGED_ATR_MULTIPLE = env_decimal("ANALYST_UNCHANGED_ATR_MULTIPLE", "0.5", minimum=Decimal("0"))
ANALYST_UNCHANGED_MAX_SECONDS = env_int("ANALYST_UNCHANGED_MAX_SECONDS", 3600, minimum=0)
# make run / compose: threads of the llm worker (each serves one model call at a time).
LLM_WORKER_THREADS = env_int("LLM_WORKER_THREADS", 8, minimum=1)
# make run / compose: processes of the orders worker (EXECUTING/CONFIRMING and the account sync, on their own queue):
# two, so an order waiting for its fill and the account sync never wait for each other.
ORDERS_WORKER_CONCURRENCY = env_int("ORDERS_WORKER_CONCURRENCY", 2, minimum=1)
# The watchlist (issue 20): at most WATCHLIST_MAX_ENABLED instruments trade at once (an import or the top-N selection
# past it is refused row by row); WATCHLIST_TOP_N > 0 enables the N USDT swaps with the largest 24-hour volume on
# OKX, refreshed daily at WATCHLIST_TOP_N_HOUR:10 UTC (0 = off: only the instruments a person enabled).
WATCHLIST_MAX_ENABLED = env_int("WATCHLIST_MAX_ENABLED", 300, minimum=1)
WATCHLIST_TOP_N = env_int("WATCHLIST_TOP_N", 0, minimum=0)
WATCHLIST_TOP_N_HOUR = env_int("WATCHLIST_TOP_N_HOUR", 0, minimum=0, maximum=23)

# USD per million tokens. cache_write is the 5-minute write price (1.25x input);
# cache_read 0.1x input unless the model's page says otherwise. Override the
# whole table with LLM_PRICES_JSON (same shape) when prices change.
LLM_PRICES: dict[str, dict[str, Decimal]] = {
    "claude-opus-4-6": {"input": Decimal("5"), "output": Decimal("25"), "cache_write": Decimal("6.25"), "cache_read": Decimal("0.50")},
    "claude-haiku-4-5-20251001": {"input": Decimal("1"), "output": Decimal("5"), "cache_write": Decimal("1.25"), "cache_read": Decimal("0.10")},
    "claude-opus-5-5": {"input": Decimal("4"), "output": Decimal("20"), "cache_write": Decimal("5"), "cache_read": Decimal("0.20")},
    "claude-sonnet-5-5": {"input": Decimal("2"), "output": Decimal("10"), "cache_write": Decimal("2.5"), "cache_read": Decimal("0.20")},
    "claude-haiku-5-5": {"input": Decimal("0.10"), "output": Decimal("0.50"), "cache_write": Decimal("0.125"), "cache_read": Decimal("0.01")},
    "sonar-pro": {"input": Decimal("3"), "output": Decimal("15"), "cache_write": Decimal("3"), "cache_read": Decimal("3")},
}
_prices_json = env_str("LLM_PRICES_JSON", "")
if _prices_json:
    try:
        LLM_PRICES = {
            model: {k: Decimal(str(v)) for k, v in row.items()} for model, row in json.loads(_prices_json).items()
        }
    except (ValueError, AttributeError, ArithmeticError) as exc:
        raise ImproperSetting(f"LLM_PRICES_JSON must be a JSON object of models to prices: {exc}") from None

# --- Research (Perplexity) -------------------------------------------------
PERPLEXITY_API_KEY = env_secret("PERPLEXITY_API_KEY")
PERPLEXITY_BASE_URL = env_str("PERPLEXITY_BASE_URL", "https://api.perplexity.ai")
PERPLEXITY_MODEL = env_str("PERPLEXITY_MODEL", "sonar-pro")
PERPLEXITY_TIMEOUT_SECONDS = env_float("PERPLEXITY_TIMEOUT_SECONDS", 20.0, minimum=1.0)
RESEARCH_CACHE_SECONDS = env_int("RESEARCH_CACHE_SECONDS", 3600, minimum=0)

# --- Self-learning -----------------------------------------------------------
REFLECTION_INTERVAL_TRADES = env_int("REFLECTION_INTERVAL_TRADES", 20, minimum=1)
REFLECTION_INTERVAL_HOURS = env_int("REFLECTION_INTERVAL_HOURS", 6, minimum=1)
# A deep reflection judges the trades since the last one and, before them, the latest earlier trades of the version
# it reflects on: this many in all (a 6 h reflection at ~2.5 trades a day would otherwise judge one or two trades).
REFLECTION_WINDOW_TRADES = env_int("REFLECTION_WINDOW_TRADES", 20, minimum=1)
PLAYBOOK_VALIDATION_DAYS = env_int("PLAYBOOK_VALIDATION_DAYS", 30, minimum=1)
# Issue 15: walk-forward validation. The PLAYBOOK_VALIDATION_DAYS are split into this many out-of-sample folds ...
PLAYBOOK_VALIDATION_FOLDS = env_int("PLAYBOOK_VALIDATION_FOLDS", 3, minimum=1)
# ... a candidate needs at least this many closed trades in them (both versions) or it waits ("not enough evidence") ...
PLAYBOOK_VALIDATION_MIN_TRADES = env_int("PLAYBOOK_VALIDATION_MIN_TRADES", 20, minimum=1)
# ... and a paired bootstrap over per-day returns must give P(candidate better) above this.
PLAYBOOK_PROMOTION_PROBABILITY = env_float("PLAYBOOK_PROMOTION_PROBABILITY", 0.8, minimum=0.5, maximum=1.0)
PLAYBOOK_MAX_DRAWDOWN_MARGIN = env_decimal("PLAYBOOK_MAX_DRAWDOWN_MARGIN", "0.02", minimum=Decimal("0"))
# The cycle length of the validation replays (the live cycle by default; 3600 = 1H cycles, 12x fewer).
PLAYBOOK_VALIDATION_CYCLE_SECONDS = env_int("PLAYBOOK_VALIDATION_CYCLE_SECONDS", 300, minimum=60)
# Claude-aware validation (tradebot/validation_claude.py): when the analyst is Claude, a candidate that changes
# what the model reads is also judged by re-deciding this many recorded analyst cycles, each decision simulated
# on the stored candles until it closes or this horizon, with at least this many simulated trades (both versions).
PLAYBOOK_CLAUDE_VALIDATION_CYCLES = env_int("PLAYBOOK_CLAUDE_VALIDATION_CYCLES", 40, minimum=1)
PLAYBOOK_CLAUDE_VALIDATION_HORIZON_HOURS = env_int("PLAYBOOK_CLAUDE_VALIDATION_HORIZON_HOURS", 48, minimum=1)
PLAYBOOK_CLAUDE_VALIDATION_MIN_TRADES = env_int("PLAYBOOK_CLAUDE_VALIDATION_MIN_TRADES", 10, minimum=1)

# --- Parameter search (issue 15: `manage.py optimize`) ----------------------
# A new study asks for this many finished trials unless --trials says otherwise.
SEARCH_TRIALS = env_int("SEARCH_TRIALS", 50, minimum=1)
# The objective: SEARCH_TRAINING_DAYS before the validation's PLAYBOOK_VALIDATION_DAYS, in this many windows
# (walk-forward: the validation folds come after them and never overlap them).
SEARCH_TRAINING_DAYS = env_int("SEARCH_TRAINING_DAYS", 30, minimum=1)
SEARCH_TRAINING_WINDOWS = env_int("SEARCH_TRAINING_WINDOWS", 3, minimum=1)
# The trials' replay cycle (seconds); the validation's by default.
SEARCH_CYCLE_SECONDS = env_int("SEARCH_CYCLE_SECONDS", PLAYBOOK_VALIDATION_CYCLE_SECONDS, minimum=60)
# A trial with fewer closed trades over its training windows is pruned (too little to rank), not scored.
SEARCH_MIN_TRADES = env_int("SEARCH_MIN_TRADES", 10, minimum=0)
# A worker running a trial writes a heartbeat this often; a trial silent for the grace period lost its worker
# (SIGKILL, power loss): it is marked lost and another trial replaces it.
SEARCH_HEARTBEAT_SECONDS = env_int("SEARCH_HEARTBEAT_SECONDS", 10, minimum=1)
SEARCH_TRIAL_GRACE_SECONDS = env_int("SEARCH_TRIAL_GRACE_SECONDS", 60, minimum=2)
if SEARCH_TRIAL_GRACE_SECONDS <= SEARCH_HEARTBEAT_SECONDS:
    raise ImproperSetting("SEARCH_TRIAL_GRACE_SECONDS must be greater than SEARCH_HEARTBEAT_SECONDS")
# How long optimize waits for reflection workers to answer a ping before it runs the trials itself.
SEARCH_WORKER_PING_SECONDS = env_float("SEARCH_WORKER_PING_SECONDS", 1.0, minimum=0.05)

# --- Telegram (issue 18: alerts and commands; `manage.py telegram`) --------
# Without a token nothing Telegram runs. Chat ids: integers, comma-separated; admin chats may also
# halt/flatten/resume/reflect/run a cycle (and get the alerts, like the allowed chats).
TELEGRAM_BOT_TOKEN = env_secret("TELEGRAM_BOT_TOKEN")
TELEGRAM_BASE_URL = env_str("TELEGRAM_BASE_URL", "https://api.telegram.org/bot")


def _chat_ids(name: str) -> tuple[int, ...]:
    raw = env_str(name, "")
    try:
        return tuple(int(part) for part in raw.replace(" ", "").split(",") if part)
    except ValueError:
        raise ImproperSetting(f"{name} must be comma-separated integer chat ids, got {raw!r}") from None


TELEGRAM_CHAT_IDS = _chat_ids("TELEGRAM_CHAT_IDS")
TELEGRAM_ADMIN_CHAT_IDS = _chat_ids("TELEGRAM_ADMIN_CHAT_IDS")
# "22-07": INFO and WARN alerts wait from 22:00 to 07:00 UTC (CRITICAL always goes); empty: none.
TELEGRAM_SILENT_HOURS = env_str("TELEGRAM_SILENT_HOURS", "")
if TELEGRAM_SILENT_HOURS and not (
    len(_hours := TELEGRAM_SILENT_HOURS.split("-")) == 2 and all(h.strip().isdigit() and int(h) < 24 for h in _hours)
):
    raise ImproperSetting(f"TELEGRAM_SILENT_HOURS must be START-END in UTC hours 0-23 (e.g. 22-07), got {TELEGRAM_SILENT_HOURS!r}")
TELEGRAM_COOLDOWN_SECONDS = env_int("TELEGRAM_COOLDOWN_SECONDS", 60, minimum=0)
TELEGRAM_DISPATCH_SECONDS = env_int("TELEGRAM_DISPATCH_SECONDS", 5, minimum=1)
TELEGRAM_SEND_TIMEOUT_SECONDS = env_float("TELEGRAM_SEND_TIMEOUT_SECONDS", 10.0, minimum=0.5)
TELEGRAM_FAILING_CYCLES = env_int("TELEGRAM_FAILING_CYCLES", 3, minimum=1)
# A failed send waits TELEGRAM_RETRY_FIRST_SECONDS, doubling per attempt up to TELEGRAM_RETRY_MAX_SECONDS
# (Telegram's own retry_after on a 429 wins): after an outage the queued alerts go within a minute of its end.
TELEGRAM_RETRY_FIRST_SECONDS = env_float("TELEGRAM_RETRY_FIRST_SECONDS", 2.0, minimum=0.01)
TELEGRAM_RETRY_MAX_SECONDS = env_float("TELEGRAM_RETRY_MAX_SECONDS", 60.0, minimum=0.01)

# --- Web / flower ----------------------------------------------------------
FLOWER_BASIC_AUTH = env_secret("FLOWER_BASIC_AUTH")

# --- Logging ---------------------------------------------------------------
LOG_LEVEL = env_choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"))
LOG_FORMAT = env_choice("LOG_FORMAT", "console", ("console", "json"))
LOGGING_CONFIG = None  # tradebot.logging configures stdlib logging and structlog
from tradebot.logging import configure_logging  # noqa: E402

configure_logging(level=LOG_LEVEL, fmt=LOG_FORMAT)

TESTING = "pytest" in sys.modules
