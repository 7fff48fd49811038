"""Configurations the tests share."""

# the smallest node: a folder destination under var/, one route for everything
FOLDER_NODE = """
[storage]
root = "var"
[deid]
secret_file = "var/secret.key"
[[destinations]]
name = "outbox"
type = "folder"
path = "var/outbox"
[[routes]]
name = "all"
destinations = ["outbox"]
"""
