"""``qlora serve``: many adapters on one (4-bit) base behind an OpenAI-compatible HTTP API.

    engine.py       batched decoding with a KV cache, continuous batching, the engine thread (also `qlora generate`)
    multi_lora.py   one forward for rows that use different adapters (stacked LoRA weights, a slot per row)
    server.py       ModelServer: the base, the adapters and their tokenizers, prompt checks; no HTTP
    app.py          the FastAPI app (OpenAI request/response shapes, streaming) and running it under uvicorn
    policy.py       what a client may do: runtime loading roots, file size limits, the API key

Nothing here is imported until ``qlora serve`` or ``qlora generate`` runs.
"""
