"""What the ``virtblk`` command runs besides serving and inspecting a device: the benchmark
(:mod:`virtblk.tools.bench`) and the conformance checks (:mod:`virtblk.tools.check`).

Both sit above the library (driver, device, vhost-user) and nothing in the library imports
them; the command loads them only when their subcommand runs.
"""
