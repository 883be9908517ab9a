"""Scale-out: several loragate engines behind one OpenAI-compatible ingress, on Ray Serve.

This package sits above the gateway and the engine (beside `cli.py`) and composes them; neither
imports it. The ingress runs the unchanged gateway app over a `RemoteEngine` (the gateway's engine
interface, served by Ray deployment handles); each replica runs one `AsyncEngine`. Adapter requests
use Ray Serve's model multiplexing with the adapter's name as the multiplexed model id, and each
replica tells Ray which adapters it holds from its engine's own adapter cache.

Only `config` and `report` import without Ray; the rest needs `pip install "loragate[ray]"`.
"""
