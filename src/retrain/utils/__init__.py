"""Small shared helpers: logging, rank-zero, config printing."""
