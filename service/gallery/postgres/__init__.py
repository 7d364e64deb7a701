"""The PostgreSQL backend: pgvector in one database shared by replicas, reads on standbys."""
