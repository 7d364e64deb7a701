"""Running the service: metrics, structured logs, readiness, memory and the decode budget."""
