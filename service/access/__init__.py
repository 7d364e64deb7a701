"""Who may do what: API keys (hashed), roles and the route policy, audit records, rate limits."""
