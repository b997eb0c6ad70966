"""HTTP, WebSocket and SSE handlers: thin layers that parse, call a service, render."""
