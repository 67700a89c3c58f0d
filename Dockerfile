# One image for every service in docker-compose.yml (web, workers, beat, flower).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DJANGO_SETTINGS_MODULE=tradebot.settings \
    TRADEBOT_VAR_DIR=/app/var

WORKDIR /app
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential libpq5 curl \
    && rm -rf /var/lib/apt/lists/*
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
# The admin's static files into /app/var/static, which WhiteNoise serves (DEBUG is off in the image).
RUN python manage.py collectstatic --noinput -v0 \
    && useradd --create-home --uid 1000 tradebot && mkdir -p /app/var && chown -R tradebot /app/var
USER tradebot

EXPOSE 8000
CMD ["python", "manage.py", "runserver", "0.0.0.0:8000", "--noreload"]
