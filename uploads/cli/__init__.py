"""`uploadsvc`, the command-line client: pushes files into Incus instances through the
service's HTTP API, like `incus file push`, and waits for them to land.

It talks only HTTP and imports nothing from Django or the rest of the app, so it runs anywhere
`requests` does.
"""
