"""One request's work: routing (``routing``: prompt → block keys → prefix index → the policy's
decision) and generation (``generation``: prefill then decode, with failover)."""
