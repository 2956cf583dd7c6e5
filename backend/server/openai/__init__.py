"""The OpenAI-compatible HTTP API: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``
and ``/health`` on aiohttp, on the server's own event loop beside grpc.aio.

One module per job: ``protocol`` reads request bodies into the engine's terms, ``choices``
submits a request's choices to the engine and merges their streams, ``responses`` writes
OpenAI's response and chunk objects, ``sse`` the event stream, ``errors`` OpenAI's error shape,
``routes`` the handlers and ``app`` the aiohttp application and its listener.
"""
