"""OKX WebSocket streams: the connection (okx_ws), public/business pushes (public), triggers, the stream-backed feed."""
