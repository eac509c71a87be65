"""The workers as the gateway reaches them: their roles (``roles``, no gRPC), the gRPC client with
typed results and errors (``client``) and the start-up profile that calibrates each one's latency
model (``profiling``)."""
