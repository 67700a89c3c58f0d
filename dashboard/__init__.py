"""The trader's cockpit: read-only dashboards with plotly charts, a page per cycle and per trade, and the bot controls.

An interface layer above `tradebot`: it imports `tradebot.controls` and every app; nothing imports it.
"""
