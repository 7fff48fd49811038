"""The node's HTTP side: console, JSON API, health and Prometheus metrics (``[http]``)."""
