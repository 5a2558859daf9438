"""The admin HTTP server (server.py) with its bearer token (token.py), and the on-demand
profile it serves: the endpoint (pull.py) and the captures riding on the daemon's sampler
(taps.py)."""
